#!/bin/sh
# `make run`: start chatweb in the foreground on $HOST:$PORT (127.0.0.1:7777).
# The key: $CHATWEB_API_KEY when set; otherwise a random key kept in the data
# directory (mode 0600), created on the first run and reused after.
set -eu
DATA_DIR=${DATA_DIR:-${XDG_DATA_HOME:-$HOME/.local/share}/chatweb}
set -- --data-dir "$DATA_DIR" --host "$HOST" --port "$PORT" --responder "$RESPONDER"
if [ -n "${CHATWEB_API_KEY:-}" ]; then
    echo "chatweb: using the API key in \$CHATWEB_API_KEY"
else
    KEY_FILE=$("$BIN/python" -m chatweb ensure-key --data-dir "$DATA_DIR")
    echo "chatweb: the API key is in $KEY_FILE  (e.g. KEY=\$(cat $KEY_FILE))"
    set -- "$@" --api-key-file "$KEY_FILE"
fi
echo "chatweb: data in $DATA_DIR; listening on http://$HOST:$PORT/ (Ctrl-C stops)"
exec "$BIN/twistd" --nodaemon --pidfile= chatweb "$@"
