#!/bin/sh
# The compose stack's Consul ACLs: default deny, one policy and one token per role, made by the
# stack itself. POSIX sh and the consul CLI only: it runs in the Consul image (Alpine's busybox in
# the official one, Debian's dash in the stand-in), with Consul 1.8 and newer.
#
#   consul-acl.sh server ARGS…   Consul's entrypoint: generates the management and agent tokens
#                                once (into the consul-acl volume), writes them into an agent
#                                config file, then execs the image's entrypoint with ARGS.
#   consul-acl.sh init           One-shot, once Consul is healthy: creates or updates a policy per
#                                role from $POLICY_DIR/ROLE-policy.hcl, makes sure each role's
#                                token exists, and writes it into that role's volume, readable by
#                                the role's uid only. Every step reuses what exists: a second
#                                `up` changes nothing (policies are updated from their files).
#
# The renderer's volume also gets the stats page's credentials: stats-auth (USER:PASSWORD) and
# renderer.toml (its [vars] stats_auth). STATS_PASSWORD sets the password; unset, one is
# generated at the first start and kept.
set -eu

ACL_DIR=${ACL_DIR:-/consul/acl}              # management and agent tokens, the agent's token config
POLICY_DIR=${POLICY_DIR:-/consul/policies}   # consul/acl/ of the checkout
ROLES_DIR=${ROLES_DIR:-/run/roles}           # one volume per role: ROLES_DIR/ROLE/ROLE
# role:uid, the uid being the `user` the role's service runs as in docker-compose.yml
ROLES=${ROLES:-"renderer:99 web:10001 registrator:0"}
STATS_USER="admin"

log() { echo "consul-acl: $*" >&2; }
die() { log "$*"; exit 1; }

new_secret() { cat /proc/sys/kernel/random/uuid; }

# write_file PATH OWNER MODE TEXT: atomically, never readable by others on the way.
write_file() {
    tmp="$1.tmp.$$"
    (umask 077 && printf '%s\n' "$4" >"$tmp")
    chown "$2" "$tmp"
    chmod "$3" "$tmp"
    mv -f "$tmp" "$1"
}

# secret_in PATH: the secret kept in PATH, generated there first if it has none.
secret_in() {
    [ -s "$1" ] || write_file "$1" 0:0 0600 "$(new_secret)"
    cat "$1"
}

# retry SECONDS CMD…: CMD until it succeeds, at most SECONDS tries a second apart.
retry() {
    tries=$1
    shift
    until "$@" >/dev/null 2>&1; do
        tries=$((tries - 1))
        [ "$tries" -gt 0 ] || { "$@"; return; }  # the last try shows its error
        sleep 1
    done
}

server() {
    mkdir -p "$ACL_DIR"
    management=$(secret_in "$ACL_DIR/management")
    agent=$(secret_in "$ACL_DIR/agent")
    # initial_management is Consul 1.11's name of 1.4's `master` (still read, with a warning).
    case "$(consul version | head -n 1)" in
        "Consul v1."[0-9].* | "Consul v1.10."*) key=master ;;
        *) key=initial_management ;;
    esac
    owner=0:0
    if id consul >/dev/null 2>&1; then owner=consul:consul; fi  # the official image drops to it
    write_file "$ACL_DIR/tokens.hcl" "$owner" 0400 \
        "acl { tokens { $key = \"$management\"
agent = \"$agent\" } }"
    exec docker-entrypoint.sh "$@"
}

ensure_policy() {  # NAME RULES_FILE
    [ -s "$2" ] || die "no policy file $2"
    id=$(consul acl policy read -name "$1" 2>/dev/null | sed -n 's/^ID: *//p')
    if [ -n "$id" ]; then
        consul acl policy update -id "$id" -rules "@$2" >/dev/null
    else
        consul acl policy create -name "$1" -description "compose stack: $1" -rules "@$2" >/dev/null
        log "policy $1 created"
    fi
}

ensure_token() {  # POLICY TOKEN_FILE: the token whose secret the file holds exists, with POLICY
    if consul acl token read -self -token-file="$2" >/dev/null 2>&1; then
        return
    fi
    consul acl token create -description "compose stack: $1" -policy-name "$1" -secret "$(cat "$2")" >/dev/null
    log "token $1 created"
}

stats_auth() {  # the renderer's stats credentials: STATS_PASSWORD, else the kept one, else new
    dir="$ROLES_DIR/renderer"
    if [ -n "${STATS_PASSWORD:-}" ]; then
        case "$STATS_PASSWORD" in
            *[!A-Za-z0-9._~+=@%-]*) die "STATS_PASSWORD: use letters, digits and . _ ~ + = @ % - only" ;;
        esac
        [ "${#STATS_PASSWORD}" -ge 8 ] || die "STATS_PASSWORD: at least 8 characters"
        auth="$STATS_USER:$STATS_PASSWORD"
    elif [ -s "$dir/stats-auth" ]; then
        auth=$(cat "$dir/stats-auth")
    else
        auth="$STATS_USER:$(new_secret | tr -d -)"
    fi
    write_file "$dir/stats-auth" 99:99 0400 "$auth"
    write_file "$dir/renderer.toml" 99:99 0400 "# written by docker/consul-acl.sh
[vars]
stats_auth = \"$auth\""
}

init() {
    export CONSUL_HTTP_TOKEN_FILE="$ACL_DIR/management"
    [ -s "$CONSUL_HTTP_TOKEN_FILE" ] || die "no management token in $ACL_DIR: is the consul-acl volume mounted?"
    # A new Consul 1.8 server answers the ACL API a little after it has a leader.
    retry 60 consul acl policy list
    ensure_policy agent "$POLICY_DIR/agent-policy.hcl"
    ensure_token agent "$ACL_DIR/agent"
    for entry in $ROLES; do
        role=${entry%%:*}
        uid=${entry#*:}
        [ -d "$ROLES_DIR/$role" ] || die "no volume for role $role at $ROLES_DIR/$role"
        ensure_policy "$role" "$POLICY_DIR/$role-policy.hcl"
        secret_in "$ROLES_DIR/$role/$role" >/dev/null
        chown "$uid:$uid" "$ROLES_DIR/$role/$role"
        chmod 0400 "$ROLES_DIR/$role/$role"
        ensure_token "$role" "$ROLES_DIR/$role/$role"
    done
    stats_auth
    log "policies and tokens ready: agent $ROLES"
}

case "${1:-}" in
    server) shift && server "$@" ;;
    init) init ;;
    *) die "usage: consul-acl.sh server ARGS… | init" ;;
esac
