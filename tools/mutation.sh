#!/usr/bin/env bash
# Mutation testing of the core modules with mutmut (pip install mutmut), outside the
# default test run: every mutant of a module must make a test fail.
#
#   tools/mutation.sh                       # the six core modules
#   tools/mutation.sh pyro_bmr/rules.py     # some of them
#   MUTMUT_TESTS="tests/test_free_energy.py tests/test_kernels.py" tools/mutation.sh ...
#                                           # mutants judged by these tests only
#   MUTMUT_ONLY="*_find* *check*" tools/mutation.sh pyro_bmr/reduction.py
#                                           # only the mutants whose names match
#
# It works on a copy of the working tree in a temporary directory (mutmut rewrites
# the sources it mutates), prints the count per outcome, then every survivor with
# its diff. On this project's 2-core machine mutmut runs about 0.4 mutants a
# second: rules.py (~130 mutants) takes about 7 minutes, the six modules (~2300)
# about 1.5 hours. "timeout" is a mutant whose tests ran far longer than usual,
# mostly one that makes torch.compile recompile: it counts as caught.
set -euo pipefail
cd "$(dirname "$0")/.."
modules=("$@")
if [ ${#modules[@]} -eq 0 ]; then
  modules=(pyro_bmr/free_energy.py pyro_bmr/rules.py pyro_bmr/_kernels.py
           pyro_bmr/_scoring.py pyro_bmr/reduction.py pyro_bmr/stochastic.py)
fi
work=$(mktemp -d)
git ls-files -co --exclude-standard -z | xargs -0 cp --parents -t "$work"
cd "$work"
{
  echo
  echo "[mutmut]"
  echo "source_paths = pyro_bmr"
  echo "only_mutate ="
  for m in "${modules[@]}"; do echo "    $m"; done
  echo "also_copy ="
  echo "    tests"
  # the fast, core part of the suite: the application, the notebooks and the docs'
  # code blocks do not test these modules more than the core tests do
  echo "pytest_add_cli_args ="
  echo "    -p no:cacheprovider"
  echo "    -q"
  # mutmut's trampolines sit inside every compiled kernel and make torch.compile
  # recompile: a test that counts recompiles would fail for every mutant
  echo "    -m"
  echo "    not counts_recompiles"
  for skip in tests/paper tests/test_tutorials.py tests/test_docs.py tests/test_readme.py tests/test_layout.py; do
    echo "    --ignore=$skip"
  done
  echo "pytest_add_cli_args_test_selection ="
  for t in ${MUTMUT_TESTS:-tests}; do echo "    $t"; done
  echo "process_isolation = forkserver"
} >> setup.cfg
# shellcheck disable=SC2086  # the patterns are words on purpose
mutmut run --max-children "${MUTMUT_CHILDREN:-2}" ${MUTMUT_ONLY:-} || true
echo
mutmut results --all true 2>/dev/null | awk -F': ' '{print $2}' | sort | uniq -c
echo
for name in $(mutmut results 2>/dev/null | awk -F': ' '$2 == "survived" {print $1}'); do
  echo "== $name"
  mutmut show "$name" | grep '^[-+][^-+]' || true
done
echo "(mutmut's files are in $work)"
