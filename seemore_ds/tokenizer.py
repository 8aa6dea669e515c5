"""Character tokenizer built from the training captions.

Characters never seen when the vocabulary was built map to ``<unk>`` (one id, shown as U+FFFD
when decoded): a caption with an unusual character is still usable, and the model learns that
``<unk>`` stands for "something rare" instead of the run failing on row 40,000.
"""

from __future__ import annotations

import json
from pathlib import Path

from seemore_ds.errors import UserError

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)
UNK_TEXT = "\ufffd"
IGNORE_INDEX = -100  # the target at padding and image positions: no token to predict, no loss


class CharTokenizer:
    def __init__(self, chars: list[str]):
        self.itos = list(SPECIALS) + list(chars)
        self.stoi = {s: i for i, s in enumerate(self.itos)}
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = (self.stoi[s] for s in SPECIALS)

    @classmethod
    def from_captions(cls, captions) -> "CharTokenizer":
        return cls(sorted(set("".join(captions))))

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    @property
    def chars(self) -> list[str]:
        return self.itos[len(SPECIALS):]

    def encode(self, text: str) -> list[int]:
        return [self.stoi.get(ch, self.unk_id) for ch in text]

    def decode(self, ids) -> str:
        out = []
        for i in ids:
            if i == self.eos_id:
                break
            if i in (self.pad_id, self.bos_id):
                continue
            out.append(UNK_TEXT if i == self.unk_id else self.itos[i])
        return "".join(out)

    def unknown_chars(self, text: str) -> set[str]:
        return {ch for ch in text if ch not in self.stoi}

    def to_dict(self) -> dict:
        return {"type": "char", "specials": list(SPECIALS), "chars": self.chars}

    @classmethod
    def from_dict(cls, data: dict) -> "CharTokenizer":
        if not isinstance(data, dict) or data.get("type") != "char" or data.get("specials") != list(SPECIALS) or not isinstance(data.get("chars"), list):
            raise UserError("tokenizer JSON is not a seemore-ds character tokenizer")
        return cls(data["chars"])

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), ensure_ascii=False, indent=1), encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> "CharTokenizer":
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise UserError(f"cannot read tokenizer {path}: {err}") from None
        return cls.from_dict(data)
