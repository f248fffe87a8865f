"""Prompt-bootstrap 95% intervals of the adapted model's AUROC per family.

Usage: python auroc_by_family_ci.py OUTPUT_DIR/selfeval_samples.jsonl  (an eval-selfeval output)
"""

import json
import random
import sys
from collections import defaultdict

from langchain_capeval.training.metrics import auroc

rows = [json.loads(line) for line in open(sys.argv[1])]
rows = [r for r in rows if r["model"] == "adapted"]
fams = defaultdict(lambda: defaultdict(list))
for r in rows:
    fams[r["family"]][r["task_id"]].append(r)
rng = random.Random(0)
for fam, by_prompt in sorted(fams.items()):
    ids = list(by_prompt)
    point = auroc([r["p_full"] for i in ids for r in by_prompt[i]], [r["correct"] for i in ids for r in by_prompt[i]])
    draws = []
    for _ in range(2000):
        pick = [rng.choice(ids) for _ in ids]
        a = auroc([r["p_full"] for i in pick for r in by_prompt[i]], [r["correct"] for i in pick for r in by_prompt[i]])
        if a is not None:
            draws.append(a)
    draws.sort()
    print(
        f"{fam}: {point:.3f} (95% CI {draws[int(0.025 * len(draws))]:.3f}..{draws[int(0.975 * len(draws)) - 1]:.3f}), {len(ids)} prompts"
    )
