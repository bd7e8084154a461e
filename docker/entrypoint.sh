#!/bin/sh
# Entrypoint of the reid images: bring the database schema to head, then become `reid serve`.
#
#   no arguments, or options only  ->  `reid db upgrade`, then `exec reid serve [OPTIONS]`
#   anything else                  ->  run as given, e.g. `reid keys create ...` or `reid db current`
#
# The migrations are retried until WAIT_FOR_DB_S seconds (default 60) have passed, because a
# database that is still starting refuses connections for a while and compose's health check is
# not there when the image runs elsewhere. REID_AUTO_MIGRATE=false (the service's own setting)
# skips them: with several replicas, run `reid db upgrade` once as a one-off job instead.
# `exec` makes the server PID 1's successor, so it receives docker's SIGTERM and shuts down cleanly.
set -eu

if [ "$#" -gt 0 ] && [ "${1#-}" = "$1" ]; then
    exec "$@"
fi

auto_migrate=$(printf '%s' "${REID_AUTO_MIGRATE:-true}" | tr '[:upper:]' '[:lower:]')
case "$auto_migrate" in
    0 | f | false | n | no | off) ;;
    *)
        wait_s=${WAIT_FOR_DB_S:-60}
        deadline=$(($(date +%s) + wait_s))
        until reid db upgrade; do
            if [ "$(date +%s)" -ge "$deadline" ]; then
                echo "reid-entrypoint: database migrations still failing after ${wait_s} s:" \
                    "check REID_DATABASE_URL and that the database is reachable" >&2
                exit 1
            fi
            echo "reid-entrypoint: database migrations failed, retrying in 2 s" >&2
            sleep 2
        done
        ;;
esac

exec reid serve "$@"
