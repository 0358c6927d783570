"""The seed simulator behind ``python -m bench seed`` (:mod:`bench.scenarios.seed`):
the traffic and its sides (:mod:`~bench.seed.sides`), the partner API both sides
call (:mod:`~bench.seed.downstream`), each side's worker code
(:mod:`~bench.seed.handlers`, :mod:`~bench.seed.stock`) and the accounting of every
event's outcome (:mod:`~bench.seed.account`)."""
