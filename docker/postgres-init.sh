#!/usr/bin/env bash
# Creates Dagster's and MLflow's databases, each owned by its own login role, on first start of the
# postgres container (/docker-entrypoint-initdb.d). Names and passwords come from the environment
# (.env), never from this file. Idempotent, so tests/e2e run it as-is against a throwaway server:
# there PGHOST/PGPORT/PGPASSWORD point psql at that server instead of the container's socket.
set -euo pipefail

: "${DAGSTER_PG_DB:?}" "${DAGSTER_PG_USER:?}" "${DAGSTER_PG_PASSWORD:?}"
: "${MLFLOW_PG_DB:?}" "${MLFLOW_PG_USER:?}" "${MLFLOW_PG_PASSWORD:?}"

create_db() {
  # Values travel as psql variables (:"ident", :'literal'), so a quote in a password is inert.
  psql -v ON_ERROR_STOP=1 --no-psqlrc --username "${POSTGRES_USER:-postgres}" \
    --dbname "${POSTGRES_DB:-postgres}" -v db="$1" -v role="$2" -v pw="$3" <<'SQL'
SELECT format('CREATE ROLE %I LOGIN', :'role')
  WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'role') \gexec
ALTER ROLE :"role" WITH LOGIN PASSWORD :'pw';
SELECT format('CREATE DATABASE %I OWNER %I', :'db', :'role')
  WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'db') \gexec
REVOKE ALL ON DATABASE :"db" FROM PUBLIC;
GRANT ALL ON DATABASE :"db" TO :"role";
SQL
}

create_db "$DAGSTER_PG_DB" "$DAGSTER_PG_USER" "$DAGSTER_PG_PASSWORD"
create_db "$MLFLOW_PG_DB" "$MLFLOW_PG_USER" "$MLFLOW_PG_PASSWORD"
echo "scriptorium: databases $DAGSTER_PG_DB (role $DAGSTER_PG_USER) and $MLFLOW_PG_DB (role $MLFLOW_PG_USER) ready"
