"""README.md is generated from nbs/index.ipynb (its markdown cells, in order), so the two never disagree.

`python .ci/readme.py` writes README.md; `python .ci/readme.py --check` exits 1 if README.md is out of date.
Quarto (nbdev_readme) is not needed.
"""
import json, sys
from pathlib import Path

root = Path(__file__).resolve().parents[1]
nb = json.loads((root / "nbs" / "index.ipynb").read_text(encoding="utf-8"))
parts = []
for cell in nb["cells"]:
    src = "".join(cell["source"]).strip("\n")
    if cell["cell_type"] == "markdown":
        parts.append(src)
    elif cell["cell_type"] == "code" and not src.startswith("#|"):
        parts.append(f"```python\n{src}\n```")
text = "<!-- generated from nbs/index.ipynb by .ci/readme.py: edit the notebook -->\n\n" + "\n\n".join(parts) + "\n"
text = text.replace("](../", "](")  # image links are relative to nbs/ in the notebook, to the root in README
readme = root / "README.md"
if "--check" in sys.argv:
    if readme.read_text(encoding="utf-8") != text:
        print("readme: README.md differs from nbs/index.ipynb: run `python .ci/readme.py`", file=sys.stderr)
        sys.exit(1)
    print("readme: README.md matches nbs/index.ipynb")
else:
    readme.write_text(text, encoding="utf-8")
    print(f"readme: wrote README.md ({len(text)} bytes)")
