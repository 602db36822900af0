#!/usr/bin/env bash
# A team MLflow tracking server: runs and metrics in PostgreSQL, artifacts in an object store
# (or a local directory) proxied by the server, and HTTP basic authentication on every request.
#
# Settings (environment; pass secrets from a secret store, never on the command line):
#   POFA_MLFLOW_BACKEND_STORE_URI  required  postgresql://USER:PASSWORD@HOST:5432/DB
#   POFA_MLFLOW_ARTIFACTS          required  s3://bucket/prefix, or an absolute local directory
#   MLFLOW_AUTH_ADMIN_USERNAME     required  admin account created on the first start
#   MLFLOW_AUTH_ADMIN_PASSWORD     required  (ignored once the admin exists; rotate it through the API)
#   MLFLOW_FLASK_SERVER_SECRET_KEY required  signs the login forms' CSRF tokens; the same on every replica
#   POFA_MLFLOW_AUTH_DATABASE_URI  optional  users and permissions; default: the backend store
#   POFA_MLFLOW_HOST               optional  interface to bind, default 127.0.0.1 (this machine only)
#   POFA_MLFLOW_PORT               optional  default 5000
#   POFA_MLFLOW_WORKERS            optional  default 2
#   POFA_MLFLOW_ALLOWED_HOSTS      optional  Host headers to accept (MLflow's --allowed-hosts); set it
#                                            to the server's DNS name when binding beyond localhost
#   POFA_MLFLOW_DEFAULT_PERMISSION optional  READ (default), EDIT, MANAGE or NO_PERMISSIONS
#   POFA_MLFLOW_AUTH_CACHE_TTL_S   optional  seconds a verified password stays cached per worker (30; 0: off)
#   POFA_MLFLOW_STATE_DIR          optional  where the rendered auth config goes (default: a new temp dir)
#   PYTHON                         optional  the interpreter that has mlflow[auth] and psycopg (python3)
#   For s3:// artifacts: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and, for MinIO and other
#   S3-compatible stores, MLFLOW_S3_ENDPOINT_URL (e.g. http://minio:9000).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
die() { echo "deploy/mlflow/start.sh: error: $*" >&2; exit 2; }

[[ -n "${POFA_MLFLOW_BACKEND_STORE_URI:-}" ]] || die "POFA_MLFLOW_BACKEND_STORE_URI is not set (postgresql://USER:PASSWORD@HOST:5432/DB)"
[[ -n "${POFA_MLFLOW_ARTIFACTS:-}" ]] || die "POFA_MLFLOW_ARTIFACTS is not set (s3://bucket/prefix or an absolute directory)"
backend="$POFA_MLFLOW_BACKEND_STORE_URI"
artifacts="$POFA_MLFLOW_ARTIFACTS"
[[ "$backend" == postgresql://* || "$backend" == postgresql+*://* ]] \
  || die "POFA_MLFLOW_BACKEND_STORE_URI must be a postgresql:// URI, got scheme '${backend%%://*}'"
case "$artifacts" in
  s3://*) [[ -n "${AWS_ACCESS_KEY_ID:-}" ]] || die "POFA_MLFLOW_ARTIFACTS=$artifacts needs AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY" ;;
  /*) mkdir -p "$artifacts" ;;
  *) die "POFA_MLFLOW_ARTIFACTS=$artifacts: expected s3://bucket/prefix or an absolute directory" ;;
esac
# MLflow would create an admin with whatever it is given; refuse to start without a real one.
[[ -n "${MLFLOW_AUTH_ADMIN_USERNAME:-}" ]] || die "MLFLOW_AUTH_ADMIN_USERNAME is not set"
[[ -n "${MLFLOW_AUTH_ADMIN_PASSWORD:-}" ]] || die "MLFLOW_AUTH_ADMIN_PASSWORD is not set"
(( ${#MLFLOW_AUTH_ADMIN_PASSWORD} >= 12 )) || die "MLFLOW_AUTH_ADMIN_PASSWORD is shorter than 12 characters"
[[ -n "${MLFLOW_FLASK_SERVER_SECRET_KEY:-}" ]] \
  || die "MLFLOW_FLASK_SERVER_SECRET_KEY is not set (a random secret, e.g. openssl rand -hex 32)"

host="${POFA_MLFLOW_HOST:-127.0.0.1}"
port="${POFA_MLFLOW_PORT:-5000}"
permission="${POFA_MLFLOW_DEFAULT_PERMISSION:-READ}"
case "$permission" in READ|EDIT|MANAGE|NO_PERMISSIONS) ;; *) die "POFA_MLFLOW_DEFAULT_PERMISSION=$permission: expected READ, EDIT, MANAGE or NO_PERMISSIONS" ;; esac
auth_db="${POFA_MLFLOW_AUTH_DATABASE_URI:-$backend}"
cache_ttl="${POFA_MLFLOW_AUTH_CACHE_TTL_S:-30}"
[[ "$cache_ttl" =~ ^[0-9]+$ ]] || die "POFA_MLFLOW_AUTH_CACHE_TTL_S=$cache_ttl: expected whole seconds"
if [[ "$host" != "127.0.0.1" && "$host" != "localhost" && "$host" != "::1" && -z "${POFA_MLFLOW_ALLOWED_HOSTS:-}" ]]; then
  echo "deploy/mlflow/start.sh: warning: binding $host without POFA_MLFLOW_ALLOWED_HOSTS; MLflow accepts" \
       "only localhost and private-IP Host headers by default" >&2
fi

# The rendered config holds the database URI (with its password): private to this user.
umask 077
state="${POFA_MLFLOW_STATE_DIR:-$(mktemp -d -t pofa-mlflow.XXXXXX)}"
mkdir -p "$state"
config="$state/basic_auth.ini"
# Python, not sed, fills the template: URIs and passwords may contain any character sed treats specially.
# The database URI travels in the environment, never on a command line (/proc/*/cmdline is world-readable).
POFA_AUTH_DB="$auth_db" "${PYTHON:-python3}" - "$here/basic_auth.ini" "$config" "$permission" "$cache_ttl" <<'PY'
import os
import sys
src, dst, permission, cache_ttl = sys.argv[1:5]
auth_db = os.environ.pop("POFA_AUTH_DB")
text = open(src).read().replace("@DEFAULT_PERMISSION@", permission).replace("@AUTH_CACHE_TTL_S@", cache_ttl)
# configparser interpolates '%' ; double it so a password with '%' survives.
text = text.replace("@AUTH_DATABASE_URI@", auth_db.replace("%", "%%"))
open(dst, "w").write(text)
PY
export MLFLOW_AUTH_CONFIG_PATH="$config"
# MLflow's background job runner serves GenAI scorers and trace archival, which pofa never uses:
# off unless asked for, which saves its worker processes and start-up time.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"

# mlflow server reads --backend-store-uri from MLFLOW_BACKEND_STORE_URI: the password stays off argv
export MLFLOW_BACKEND_STORE_URI="$backend"
args=(server --app-name basic-auth
      --serve-artifacts --artifacts-destination "$artifacts"
      --host "$host" --port "$port" --workers "${POFA_MLFLOW_WORKERS:-2}")
[[ -z "${POFA_MLFLOW_ALLOWED_HOSTS:-}" ]] || args+=(--allowed-hosts "$POFA_MLFLOW_ALLOWED_HOSTS")
echo "deploy/mlflow/start.sh: MLflow on http://$host:$port, artifacts in $artifacts, basic auth on" >&2
exec "${PYTHON:-python3}" -m mlflow "${args[@]}"
