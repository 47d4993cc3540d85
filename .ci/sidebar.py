"""Write nbs/sidebar.yml: the docs sidebar lists index then the numbered notebooks in reading order."""
from pathlib import Path
nbs = Path(__file__).resolve().parent.parent / "nbs"
items = ["index.ipynb"] + sorted(p.name for p in nbs.glob("[0-9][0-9]*.ipynb"))
(nbs / "sidebar.yml").write_text("website:\n  sidebar:\n    contents:\n" + "".join(f"      - {i}\n" for i in items))
