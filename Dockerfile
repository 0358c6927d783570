# syntax=docker/dockerfile:1
# The pipeline image: one image for every role (tier workers, the ingest API,
# Flower, the exporter); the role is the command, e.g. `worker --tier critical`.
# Build: docker build -t celery-event-pipeline:local .
# Your handlers: build FROM this image and `pip install` your package, then set
# PIPELINE_HANDLER_MODULES (see docs/operations.md).

ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
# Wheels of the package and every dependency, so the runtime stage needs no compiler.
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[gevent]"  # gevent: tiers with pool = "gevent"

FROM python:${PYTHON_VERSION}-slim-bookworm
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN useradd --system --uid 10001 --user-group --home-dir /app --create-home pipeline \
    && install -d -o 10001 -g 10001 /var/lib/pipeline/metrics  # the shared metrics volume
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links /wheels "celery-event-pipeline[gevent]" \
    && rm -rf /wheels
USER 10001:10001
WORKDIR /app
# 8000 ingest API, 5555 Flower, 9808 exporter; workers listen on nothing.
EXPOSE 8000 5555 9808
# Celery's warm shutdown on SIGTERM: running tasks finish, prefetched ones go back.
STOPSIGNAL SIGTERM
ENTRYPOINT ["pipeline"]
CMD ["--help"]
