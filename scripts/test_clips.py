"""Print N avdigits test clips of different classes (paths), for ``make demo``'s cign-live runs."""
import csv
import sys
from pathlib import Path

root, n = Path(sys.argv[1]), int(sys.argv[2])
with open(root / "avdigits.csv", newline="") as f:
    rows = [r for r in csv.reader(f) if r[3] == "test"]
picked, seen = [], set()
for youtube_id, start, label, _ in rows:
    if label not in seen and len(picked) < n:
        seen.add(label)
        picked.append(str(root / "clips" / f"{youtube_id}_{int(start):06d}.mp4"))
print(" ".join(picked))
