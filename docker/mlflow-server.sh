#!/usr/bin/env bash
# The MLflow tracking server of the compose stack: runs and the model registry in PostgreSQL,
# artefacts uploaded and downloaded through the server (--serve-artifacts) into
# MLFLOW_ARTIFACTS_DESTINATION, and only the Host headers in MLFLOW_ALLOWED_HOSTS accepted.
# The database URI is assembled here from the environment so no password sits in the image or in
# docker-compose.yml; tests/e2e/test_postgres_deploy.py runs this very script.
set -euo pipefail

: "${MLFLOW_PG_USER:?}" "${MLFLOW_PG_PASSWORD:?}" "${MLFLOW_PG_DB:?}" "${MLFLOW_ALLOWED_HOSTS:?}"
PG_HOST=${MLFLOW_PG_HOST:-postgres}
PG_PORT=${MLFLOW_PG_PORT:-5432}
PYTHON=${PYTHON:-python}

# Percent-encode user and password: characters such as @ / : would otherwise break the URI.
quote() { "$PYTHON" -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1], safe=""))' "$1"; }
MLFLOW_BACKEND_STORE_URI="postgresql+psycopg2://$(quote "$MLFLOW_PG_USER"):$(quote "$MLFLOW_PG_PASSWORD")@${PG_HOST}:${PG_PORT}/${MLFLOW_PG_DB}"
export MLFLOW_BACKEND_STORE_URI  # read by `mlflow server` (envvar), so it is not on the command line

exec "$PYTHON" -m mlflow server \
  --serve-artifacts \
  --artifacts-destination "${MLFLOW_ARTIFACTS_DESTINATION:-/mlartifacts}" \
  --host "${MLFLOW_HOST:-0.0.0.0}" \
  --port "${MLFLOW_PORT:-5000}" \
  --workers "${MLFLOW_WORKERS:-2}" \
  --allowed-hosts "$MLFLOW_ALLOWED_HOSTS"
