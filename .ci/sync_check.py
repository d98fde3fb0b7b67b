"""Prove that notebooks and package agree: `nbdev_export` and `nbdev_clean` must change nothing.

Notebooks are the source; a module that differs from its notebook would be lost at the next export, and an uncleaned
notebook carries outputs and metadata into git. Run with the venv's Python: `python .ci/sync_check.py`.
"""
import hashlib, subprocess, sys
from pathlib import Path

root = Path(__file__).resolve().parents[1]
bindir = Path(sys.executable).parent


def snapshot():
    files = [*root.glob("mario_a3c/**/*.py"), *root.glob("nbs/**/*.ipynb")]
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files
            if ".ipynb_checkpoints" not in p.parts}


failed = False
for tool in ("nbdev_export", "nbdev_clean"):
    before = snapshot()
    res = subprocess.run([str(bindir / tool)], cwd=root, capture_output=True, text=True)
    if res.returncode:
        print(f"sync-check: {tool} failed (exit {res.returncode}):\n{res.stdout}{res.stderr}", file=sys.stderr)
        sys.exit(1)
    after = snapshot()
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    if changed:
        failed = True
        what = "the package and the notebooks disagree" if tool == "nbdev_export" else "notebooks were not clean"
        print(f"sync-check: {tool} changed {len(changed)} file(s), {what}: {', '.join(changed)}", file=sys.stderr)
if failed:
    print("sync-check: edit the notebooks, run nbdev_export and nbdev_clean, and commit the result", file=sys.stderr)
    sys.exit(1)
print(f"sync-check: nbdev_export and nbdev_clean change nothing ({len(snapshot())} files)")
