#!/bin/sh
# `make run`: start chatweb in the foreground on $HOST:$PORT (127.0.0.1:7777),
# with any further twistd chatweb options given as arguments (make run
# ARGS="--allowed-host box.lan").
# The key: $CHATWEB_API_KEY, or a key option in the arguments; otherwise a
# random key kept in the data directory (mode 0600), created on the first run
# and reused after.
set -eu
DATA_DIR=${DATA_DIR:-${XDG_DATA_HOME:-$HOME/.local/share}/chatweb}

keyGiven=
hostsGiven=
for argument in "$@"; do
    case $argument in
        --api-key|--api-key=*|--api-key-file|--api-key-file=*) keyGiven=yes ;;
        --allowed-host|--allowed-host=*) hostsGiven=yes ;;
    esac
done

set -- --data-dir "$DATA_DIR" --host "$HOST" --port "$PORT" --responder "$RESPONDER" "$@"
if [ -n "${CHATWEB_API_KEY:-}" ]; then
    if [ -n "$keyGiven" ]; then
        echo "chatweb: CHATWEB_API_KEY is set and ARGS gives a key too: give only one" >&2
        exit 2
    fi
    echo "chatweb: using the API key in \$CHATWEB_API_KEY"
elif [ -z "$keyGiven" ]; then
    KEY_FILE=$("$BIN/python" -m chatweb ensure-key --data-dir "$DATA_DIR")
    echo "chatweb: the API key is in $KEY_FILE  (e.g. KEY=\$(cat $KEY_FILE))"
    set -- "$@" --api-key-file "$KEY_FILE"
fi
case $HOST in
    0.0.0.0|::|"")
        if [ -z "$hostsGiven" ]; then
            echo "chatweb: pages are shown to other machines only under the names you allow:"
            echo "chatweb:   make run HOST=$HOST ARGS=\"--allowed-host $(hostname)\"  (the name typed in the browser)"
        fi ;;
esac
echo "chatweb: data in $DATA_DIR; starting on $HOST:$PORT (Ctrl-C stops)"
# Ctrl-C (or SIGTERM) stops twistd cleanly, and this script then ends with
# status 0, so that make reports no error.  twistd runs in the background so
# that a SIGTERM sent to make (and from it to this shell) is passed on; it
# gets SIGINT back (a background command starts with it ignored), so that
# Ctrl-C reaches it.
stopped=
pid=
trap 'stopped=yes' INT
trap 'stopped=yes; kill -TERM "$pid" 2>/dev/null' TERM
"$BIN/python" -c 'import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execv(sys.argv[1], sys.argv[1:])' \
    "$BIN/twistd" --nodaemon --pidfile= chatweb "$@" &
pid=$!
status=0
wait "$pid" || status=$?
while [ -n "$stopped" ] && kill -0 "$pid" 2>/dev/null; do
    wait "$pid" || true
done
if [ -n "$stopped" ]; then
    exit 0
fi
exit "$status"
