# One image for the three Tidings services; the command picks which one runs:
#   docker build -t tidings .
#   docker run tidings python -m services.identity            (serve; migrates at start-up)
#   docker run tidings python -m services.identity migrate    (only migrate, then exit)
# docker-compose.yml runs identity, journey and delivery from it. Settings come from TIDINGS_*
# variables (services/runtime/settings.py).

ARG PYTHON_IMAGE=python:3.11-slim

# ---- deps: the runtime dependencies in a virtualenv, cached until pyproject.toml changes.
FROM ${PYTHON_IMAGE} AS deps
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml ./
# The dependency list straight from pyproject.toml, so this layer does not depend on the code.
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > requirements.txt \
 && pip install -r requirements.txt

# ---- gen: Python code generated from protos/ by the project's own script (not committed).
FROM deps AS gen
# Only the generator tools from the dev extras (same pins): not the test and lint tools.
RUN python -c "import re, tomllib; dev = tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['dev']; print('\n'.join(r for r in dev if re.split('[<>=!~ ]', r)[0] in {'grpcio-tools', 'mypy-protobuf', 'buf-bin'}))" > gen-requirements.txt \
 && pip install -r gen-requirements.txt
COPY protos ./protos
COPY scripts/protos.sh ./scripts/protos.sh
# protos.sh writes gen/ and lints with buf, exactly as `make protos` does on a developer machine.
RUN PYTHON=/opt/venv/bin/python bash scripts/protos.sh --force \
 && find gen -name '*.pyi' -delete && rm -f gen/image.binpb gen/.stamp

# ---- runtime
FROM ${PYTHON_IMAGE}
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app:/app/gen \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TIDINGS_LOG_FORMAT=json
RUN useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin tidings
COPY --from=deps /opt/venv /opt/venv
WORKDIR /app
# The services run from the source tree (PYTHONPATH), migrations (*.sql) included.
COPY --chown=root:root services ./services
COPY --from=gen /src/gen ./gen
COPY deploy/healthcheck.py ./deploy/healthcheck.py
USER tidings
# gRPC, metrics, delivery's tracking HTTP; each service uses its own pair (see docker-compose.yml).
EXPOSE 50051 50052 50053 9101 9102 9103 8080
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "/app/deploy/healthcheck.py"]
CMD ["python", "-m", "services.identity"]
