#!/usr/bin/env bash
# After ../shared/gpu/wheels.sh, from the project's root: keeps the main evidence call's carry (the working tree,
# .whl and .whl-fa4a) within LIMIT bytes (default 62,000,000; the device tool takes 64 MiB) by moving the last
# bytes of FlashAttention-4's compiler wheel's first part (.whl-fa4a/part-a) to the front of its second
# (.whl-fa4b/part-b). The fa4 call joins them again (`cat part-a part-b`), so the wheel is the same.
#   scripts/carry-split.sh [LIMIT]
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
limit=${1:-62000000}
bytes() { du -cb "$@" | tail -1 | cut -f1; }
# what the device copies besides the carry: tracked files and untracked ones git doesn't ignore
tree=$( { git ls-files -z; git ls-files -z --others --exclude-standard; } | xargs -0 -r du -cb | awk '$2 == "total" {n += $1} END {print n + 0}')
main=$(( tree + $(bytes .whl) + $(bytes .whl-fa4a) ))
a=.whl-fa4a/part-a b=.whl-fa4b/part-b
excess=$(( main - limit ))
if (( excess > 0 )); then
    keep=$(( $(stat -c %s "$a") - excess ))
    (( keep > 0 )) || { echo "carry-split: the tree and .whl alone exceed $limit bytes" >&2; exit 1; }
    { tail -c +$(( keep + 1 )) "$a"; cat "$b"; } > "$b.tmp"
    truncate -s "$keep" "$a" && mv -f "$b.tmp" "$b"
    main=$limit
fi
echo "main call: $main bytes (tree $tree); fa4 call: $(( tree + $(bytes .whl-fa4b) )) bytes"
