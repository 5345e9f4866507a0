"""Quality after load: the unquantized reference logits and greedy generation. Stages may import it; it
imports only the core and checkpoints."""

from pathlib import Path

# the bundled evaluation text (its source and licence: data/README.md)
EVAL_TEXT = Path(__file__).resolve().parent / "data" / "eval.txt"
