#!/usr/bin/env bash
# The test groups of `make test` and `make test-slow`, one after another, each group one pytest process
# (the Makefile names the groups and passes them here):
#
#   tests/run_suite.sh "not slow"   # make test
#   tests/run_suite.sh slow         # make test-slow
#
# Order: pure logic, SESSION_1 (one Ray session), SESSION_2 (another), then each OWN_RAY_TESTS file.
# Not side by side: on the 2-core machine, SESSION_1 beside the rest took 11m30s in all where one
# after another had taken 11m44s with ~40 s fewer tests (each Ray group ran ~2x slower), and the
# worker-kill tests find the workers to kill among all of the machine's processes. pytest's exit status 5 is "no test selected": a group
# with no test of the marker asked for.
set -u
MARK=$1
: "${PYTEST:?} ${PURE_TESTS:?} ${SESSION_1:?} ${SESSION_2:?} ${OWN_RAY_TESTS:?}"

status=0
group() {  # group NAME FILES...: one pytest process; a failed test sets status=1
    local name=$1; shift
    echo "== $name ($MARK): $*"
    # shellcheck disable=SC2086  # PYTEST is a command line
    $PYTEST -m "$MARK" "$@"
    local rc=$?
    [ $rc -eq 0 ] || [ $rc -eq 5 ] || status=1
}

# shellcheck disable=SC2086  # word splitting: the lists are space-separated file names
group "pure logic" $PURE_TESTS
# shellcheck disable=SC2086
group "one Ray session" $SESSION_1
# shellcheck disable=SC2086
group "one Ray session" $SESSION_2
for f in $OWN_RAY_TESTS; do group "$f" "$f"; done
exit $status
