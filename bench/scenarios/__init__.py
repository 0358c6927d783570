"""One module per ``python -m bench <scenario>``, named after it, each with
``main(argv) -> int``; what they share lives one level up (:mod:`bench.common`)."""
