#!/bin/sh
# Writes the Mosquitto ACL of an Outpost fleet (outpost-fleet.conf's
# acl_file) from a list of devices, so nobody edits it by hand.
#
#   make-acl.sh [-p PREFIX] [-o OPERATOR]... [-c CLIENT]... [FILE] > acl
#
# FILE (default: standard input) has one device a line: its id (the CN of its
# certificate) and the groups it follows, e.g.
#
#   cam-1 cameras site-berlin
#   cam-2 cameras
#   gate-7
#
# Everything after a # is a comment. Names are [A-Za-z0-9_.-]{1,64}, as the
# agent requires.
#
#   -p PREFIX    the agents' topic prefix (--topic-prefix; default outpost)
#   -o OPERATOR  a certificate CN with full access to PREFIX/# (repeatable;
#                default: one operator, "operator")
#   -c CLIENT    a certificate CN of an inference client (repeatable): it may
#                send requests to every device and read their predictions and
#                its own replies, PREFIX/replies/CLIENT/#
#
# What a device may do comes from `pattern` lines with %u (its CN), which
# Mosquitto applies to every user; its groups' topics come from its own
# `user` block. Mosquitto grants an access when any line of the user's block
# or any pattern grants it (none of the lines here is a `deny`).
#
# Exit codes: 0 done, 64 bad usage, 65 a bad line in the device list.
# -f: no file name expansion anywhere (names are split into words, never globbed).
set -euf

prog=${0##*/}
prefix=outpost
operators=
clients=

usage() {
    echo "usage: $prog [-p PREFIX] [-o OPERATOR]... [-c CLIENT]... [FILE]" >&2
    exit 64
}

# valid_name NAME: the agent's rule for device and group names.
valid_name() {
    case $1 in
        '' | *[!A-Za-z0-9_.-]*) return 1 ;;
    esac
    [ "${#1}" -le 64 ]
}

# listed LIST NAME: whether NAME is a word of LIST (names hold no spaces).
listed() {
    case " $1 " in
        *" $2 "*) return 0 ;;
    esac
    return 1
}

while getopts p:o:c: opt; do
    case $opt in
        p) prefix=$OPTARG ;;
        o) operators="$operators $OPTARG" ;;
        c) clients="$clients $OPTARG" ;;
        *) usage ;;
    esac
done
shift $((OPTIND - 1))
[ $# -le 1 ] || usage
[ -n "$operators" ] || operators=operator

case $prefix in
    '' | /* | */ | *//* | *[+#]* | *[[:space:]]*)
        echo "$prog: -p '$prefix': expected a topic prefix without wildcards, spaces or a leading or trailing '/'" >&2
        exit 64 ;;
esac
people=
for name in $operators $clients; do
    if ! valid_name "$name"; then
        echo "$prog: '$name': expected an operator or client name of [A-Za-z0-9_.-]{1,64}" >&2
        exit 64
    fi
    if listed "$people" "$name"; then
        echo "$prog: '$name' is named twice among operators and clients" >&2
        exit 64
    fi
    people="$people $name"
done

source=${1:-standard input}
if [ $# -eq 1 ]; then
    if [ ! -r "$1" ]; then
        echo "$prog: $1: cannot read it" >&2
        exit 64
    fi
    exec <"$1"
fi

# The device blocks, made by awk (a shell loop takes a minute for 10,000
# devices) into a buffer: nothing is written unless every line is good, so
# write to a new file and move it over the old one only then.
devices=$(awk -v prefix="$prefix" -v people="$people" -v source="$source" '
    function fail(msg) {
        print "'"$prog"': " source ", line " NR ": " msg | "cat 1>&2"
        bad = 1
        exit 65
    }
    function valid(name) {
        return name ~ /^[A-Za-z0-9_.-]+$/ && length(name) <= 64
    }
    BEGIN {
        n = split(people, p, " ")
        for (i = 1; i <= n; i++) person[p[i]] = 1
    }
    # Comments (names hold no "#"), and a CR from a file edited on Windows.
    { sub(/#.*/, ""); sub(/\r$/, "") }
    NF == 0 { next }
    {
        device = $1
        if (!valid(device)) fail("device \047" device "\047: expected [A-Za-z0-9_.-]{1,64}")
        # One CN, one role: a device named like an operator would get both accesses.
        if (device in person) fail("device \047" device "\047 is also the name of an operator or client")
        if (device in seen) fail("device \047" device "\047 is listed a second time (line " seen[device] ")")
        seen[device] = NR
        if (lines) out[++lines] = ""
        out[++lines] = "user " device
        out[++lines] = "topic write " prefix "/replies/#"
        split("", groups)
        for (i = 2; i <= NF; i++) {
            g = $i
            if (!valid(g)) fail("group \047" g "\047 of " device ": expected [A-Za-z0-9_.-]{1,64}")
            if (g in groups) continue
            groups[g] = 1
            out[++lines] = "topic read " prefix "/groups/" g "/desired"
            out[++lines] = "topic read " prefix "/groups/" g "/models/+/desired"
        }
    }
    END {
        if (bad) exit 65
        for (i = 1; i <= lines; i++) print out[i]
    }
') || exit 65

cat <<EOF
# Mosquitto ACL of an Outpost fleet, written by make-acl.sh from $source.
# Do not edit: change the device list and run make-acl.sh again, then
# reload the broker (systemctl reload mosquitto).
#
# A client's user name is its certificate's CN (use_identity_as_username).
# Mosquitto grants an access when a line of the client's own user block or
# any pattern line grants it. Subscriptions are always accepted; what a
# client may not read is simply not delivered to it, and a publish it may
# not make is dropped (an MQTT 3.1.1 client still gets its PUBACK).

# Every device (%u: its CN, which is its device id): its own desired state
# (and those of its future model slots) and inference requests in, its own
# reports out. Availability includes its Last Will.
pattern read $prefix/devices/%u/desired
pattern read $prefix/devices/%u/models/+/desired
pattern read $prefix/devices/%u/infer
pattern read $prefix/devices/%u/models/+/infer
pattern write $prefix/devices/%u/availability
pattern write $prefix/devices/%u/state
pattern write $prefix/devices/%u/events
pattern write $prefix/devices/%u/telemetry
pattern write $prefix/devices/%u/predictions
pattern write $prefix/devices/%u/capture

# Operators: everything under the prefix, and the broker's own statistics.
EOF
for name in $operators; do
    printf 'user %s\ntopic readwrite %s/#\ntopic read $SYS/#\n\n' "$name" "$prefix"
done

if [ -n "$clients" ]; then
    printf '%s\n' "# Inference clients: requests to any device, the devices' predictions, and" \
        "# answers to the reply_to topics under their own $prefix/replies/<name>/."
    for name in $clients; do
        printf 'user %s\ntopic write %s/devices/+/infer\ntopic write %s/devices/+/models/+/infer\ntopic read %s/devices/+/predictions\ntopic read %s/replies/%s/#\n\n' \
            "$name" "$prefix" "$prefix" "$prefix" "$prefix" "$name"
    done
fi

printf '%s\n' "# Devices: answers to requests with a reply_to (or an MQTT 5 response topic)" \
    "# go under $prefix/replies/; each reads the desired state of its groups."
printf '%s\n' "$devices"
