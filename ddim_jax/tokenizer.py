"""CLIP's byte-level BPE tokenizer, read from a Stable Diffusion folder's ``tokenizer/`` files.

The text model of SD 1.x (OpenAI CLIP ViT-L/14) and SD 2.x (OpenCLIP ViT-H/14) reads 77 token ids:
``<|startoftext|>``, at most 75 ids of the prompt, ``<|endoftext|>``, then the folder's pad token (SD 1.x
folders pad with ``<|endoftext|>``, 49407; SD 2.x folders with ``!``, id 0). :class:`CLIPTokenizer` builds
the BPE on the ``tokenizers`` library exactly as transformers' ``CLIPTokenizer`` does, which is what
diffusers' pipelines run: NFC, whitespace runs to one space, lower case (no ftfy, no html unescaping),
CLIP's pre-split regex, byte-level BPE with the ``</w>`` end-of-word suffix. The special tokens, the pad
token included, are matched in the text as whole tokens, as transformers does: an SD 2.x folder therefore
reads every ``!`` as the pad id 0 (diffusers' behaviour; OpenCLIP's own tokenizer reads ``!`` as 256).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    normalizers,
    pre_tokenizers,
)
from tokenizers.models import BPE

from ddim_jax.files import atomic_write

FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")
# CLIP's pre-split (openai/CLIP simple_tokenizer.py); the text is lower-cased before it.
SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token")
DEFAULTS = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
            "pad_token": "<|endoftext|>"}
MERGES_HEADER = "#version: 0.2"


def _content(value: Any) -> str | None:
    """A special token as the json files write it: a string, or an AddedToken dict with its ``content``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _added(value: Any) -> AddedToken:
    """A special token to match in the text; an AddedToken dict keeps its flags (transformers reads them)."""
    if isinstance(value, dict):
        flags = {k: bool(value[k]) for k in ("lstrip", "rstrip", "single_word", "normalized") if k in value}
        return AddedToken(value["content"], special=True, **flags)
    return AddedToken(value, special=True)


def _added_dict(content: str) -> dict:
    """A special token as openai/clip-vit-large-patch14's files write it."""
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True, "rstrip": False,
            "single_word": False}


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing")
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    if isinstance(obj, dict):
        return obj
    raise ValueError(f"{path} holds a JSON {type(obj).__name__}, not an object")


def _read_vocab(path: str) -> dict[str, int]:
    return _check_vocab(_read_json(path), path)


def _check_vocab(vocab: Any, path: str) -> dict[str, int]:
    if not isinstance(vocab, dict):
        raise ValueError(f"{path} holds no token -> id map")
    bad = next(((k, v) for k, v in vocab.items() if not isinstance(v, int) or isinstance(v, bool)), None)
    if bad is not None:
        raise ValueError(f"{path} maps {bad[0]!r} to {bad[1]!r}, not an integer id")
    if len(set(vocab.values())) != len(vocab):
        raise ValueError(f"{path} gives two tokens the same id")
    return vocab


def _read_merges(path: str) -> list[tuple[str, str]]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing")
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e})") from None
    merges = []
    for n, line in enumerate(lines, 1):
        if not line or (n == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not all(parts):
            raise ValueError(f"{path} line {n} is not a merge (two tokens and one space): {line[:60]!r}")
        merges.append((parts[0], parts[1]))
    if not merges:
        raise ValueError(f"{path} holds no merges")
    return merges


def _read_tokenizer_json(path: str) -> tuple[dict[str, int], list[tuple[str, str]], dict[str, dict]]:
    """The vocab, merges and added tokens (by content) of a ``tokenizer.json`` holding CLIP's BPE (the layout
    transformers 5 saves a CLIP tokenizer in, beside ``tokenizer_config.json``)."""
    obj = _read_json(path)
    model = obj.get("model")
    if not isinstance(model, dict) or model.get("type") != "BPE" or model.get("end_of_word_suffix") != "</w>":
        kind = model.get("type") if isinstance(model, dict) else None
        raise ValueError(f"{path} does not hold CLIP's BPE (a BPE model with end-of-word suffix </w>); "
                         f"its model is {kind!r}")
    vocab = _check_vocab(model.get("vocab"), path)
    merges = []
    for n, m in enumerate(model.get("merges") or []):
        parts = m.split(" ") if isinstance(m, str) else m
        if not isinstance(parts, (list, tuple)) or len(parts) != 2 or not all(isinstance(x, str) and x for x in parts):
            raise ValueError(f"{path} merge {n} is not a pair of tokens: {str(m)[:60]!r}")
        merges.append((parts[0], parts[1]))
    if not merges:
        raise ValueError(f"{path} holds no merges")
    added = {t["content"]: t for t in obj.get("added_tokens") or [] if isinstance(t, dict) and "content" in t}
    return vocab, merges, added


def tokenizer_dir(path: str, subfolder: str = "tokenizer") -> str:
    """The folder holding the tokenizer files: ``path/subfolder`` when it exists (an SD folder), else ``path``."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} is not a folder (a Stable Diffusion folder or its {subfolder}/)")
    sub = os.path.join(path, subfolder)
    return sub if os.path.isdir(sub) else path


class CLIPTokenizer:
    """CLIP's tokenizer: ``tokenizer(prompts) -> int32 [B, max_length]``.

    ``config`` and ``special_tokens_map`` are the contents of ``tokenizer_config.json`` and
    ``special_tokens_map.json``; the special tokens are read from them as transformers reads them (the
    map overrides the config unless the config lists ``added_tokens_decoder``), and :meth:`save` writes
    them back.
    """

    def __init__(self, vocab: dict[str, int], merges: Sequence[tuple[str, str]], config: dict | None = None,
                 special_tokens_map: dict | None = None, *, source: str = "the tokenizer"):
        self.vocab = dict(vocab)
        self.merges = [tuple(m) for m in merges]
        self.config = dict(config or {})
        self.special_tokens_map = dict(special_tokens_map or {})
        tokens = {k: self.config.get(k, DEFAULTS[k]) for k in SPECIAL}
        origin = {k: "tokenizer_config.json" for k in SPECIAL}
        if "added_tokens_decoder" not in self.config:
            tokens.update({k: v for k, v in self.special_tokens_map.items() if k in SPECIAL})
            origin.update({k: "special_tokens_map.json" for k in self.special_tokens_map if k in SPECIAL})
        for key, value in tokens.items():
            where = os.path.join(source, origin[key])
            if _content(value) is None:
                raise ValueError(f"{where}: {key} is {value!r}, not a token")
            if _content(value) not in self.vocab:
                raise ValueError(f"{where}: {key} {_content(value)!r} is not in {os.path.join(source, 'vocab.json')}")
        self.bos_token, self.eos_token, self.unk_token, self.pad_token = (_content(tokens[k]) for k in SPECIAL)
        self.bos_id, self.eos_id, self.pad_id = (self.vocab[t]
                                                 for t in (self.bos_token, self.eos_token, self.pad_token))
        max_length = self.config.get("model_max_length", 77)
        if not isinstance(max_length, (int, float)) or isinstance(max_length, bool) or max_length != int(max_length) \
                or not 2 <= max_length <= 4096:
            raise ValueError(f"{os.path.join(source, 'tokenizer_config.json')}: model_max_length is {max_length!r}; "
                             "CLIP text models read 77 tokens")
        self.max_length = int(max_length)

        try:
            model = BPE(vocab=self.vocab, merges=self.merges, continuing_subword_prefix="", end_of_word_suffix="</w>",
                        fuse_unk=False, unk_token=self.unk_token, dropout=None)
        except Exception as e:  # noqa: BLE001 - the tokenizers library raises its own exception type
            raise ValueError(f"{os.path.join(source, 'merges.txt')} and vocab.json do not make a BPE ({e})") from None
        tok = Tokenizer(model)
        tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                               normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False)])
        tok.decoder = decoders.ByteLevel()
        for key in ("unk_token", "bos_token", "eos_token", "pad_token"):  # a later one with the same text wins
            tok.add_special_tokens([_added(tokens[key])])
        self._tokenizer = tok

    @classmethod
    def from_files(cls, vocab: str, merges: str, *, bos_token: str = "<|startoftext|>",
                   eos_token: str = "<|endoftext|>", unk_token: str = "<|endoftext|>", pad_token: str = "<|endoftext|>",
                   max_length: int = 77) -> CLIPTokenizer:
        """A tokenizer from ``vocab.json`` and ``merges.txt``, with the special tokens given; they are written
        as in openai/clip-vit-large-patch14's folder (start, end and unknown tokens match case-insensitively)."""
        vocab, merges = os.fspath(vocab), os.fspath(merges)
        vocab_map = _read_vocab(vocab)
        tokens = {"bos_token": _added_dict(bos_token), "eos_token": _added_dict(eos_token),
                  "unk_token": _added_dict(unk_token), "pad_token": pad_token}
        config = {**tokens, "model_max_length": max_length, "tokenizer_class": "CLIPTokenizer", "do_lower_case": True}
        return cls(vocab_map, _read_merges(merges), config, tokens, source=os.path.dirname(os.path.abspath(vocab)))

    @classmethod
    def from_folder(cls, path: str, subfolder: str = "tokenizer") -> CLIPTokenizer:
        """The tokenizer of a diffusers Stable Diffusion folder (``path/tokenizer/``), or of a folder holding
        the four files itself (``vocab.json``, ``merges.txt``, ``tokenizer_config.json``,
        ``special_tokens_map.json``), or the two transformers 5 saves (``tokenizer.json``,
        ``tokenizer_config.json``). Other layouts are refused."""
        d = tokenizer_dir(path, subfolder)
        names = set(os.listdir(d))
        if "vocab.json" not in names and "merges.txt" not in names:
            sentencepiece = sorted(n for n in names if n.endswith(".model"))
            if sentencepiece:
                raise ValueError(f"{os.path.join(d, sentencepiece[0])} is a sentencepiece model, not CLIP's BPE "
                                 "(vocab.json and merges.txt)")
            if "tokenizer.json" in names:
                return cls._from_tokenizer_json(d)
        for name in FILES:
            if name not in names:
                raise FileNotFoundError(f"{os.path.join(d, name)} is missing (a CLIP tokenizer folder holds "
                                        f"{', '.join(FILES)})")
        vocab = _read_vocab(os.path.join(d, "vocab.json"))
        merges = _read_merges(os.path.join(d, "merges.txt"))
        config_path = os.path.join(d, "tokenizer_config.json")
        config = _read_json(config_path)
        kind = config.get("tokenizer_class")
        if kind is not None and kind not in ("CLIPTokenizer", "CLIPTokenizerFast"):
            raise ValueError(f"{config_path} names tokenizer_class {kind!r}, not CLIPTokenizer")
        special = _read_json(os.path.join(d, "special_tokens_map.json"))
        return cls(vocab, merges, config, special, source=d)

    @classmethod
    def _from_tokenizer_json(cls, d: str) -> CLIPTokenizer:
        """transformers 5's layout: the BPE in ``tokenizer.json``, the special tokens named in
        ``tokenizer_config.json`` with their flags in ``tokenizer.json``'s added tokens."""
        config_path = os.path.join(d, "tokenizer_config.json")
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"{config_path} is missing (beside tokenizer.json it names the special tokens)")
        vocab, merges, added = _read_tokenizer_json(os.path.join(d, "tokenizer.json"))
        config = _read_json(config_path)
        kind = config.get("tokenizer_class")
        if kind is not None and kind not in ("CLIPTokenizer", "CLIPTokenizerFast"):
            raise ValueError(f"{config_path} names tokenizer_class {kind!r}, not CLIPTokenizer")
        special = {}
        for name in SPECIAL:
            content = _content(config.get(name))
            if content is not None:
                flags = {k: bool(added[content][k]) for k in ("lstrip", "normalized", "rstrip", "single_word")
                         if content in added and k in added[content]}
                special[name] = {"__type": "AddedToken", "content": content, **flags}
        return cls(vocab, merges, config, special, source=d)

    def save(self, dst_dir: str) -> str:
        """Writes the four files into ``dst_dir`` (created); :meth:`from_folder` reads them back."""
        dst_dir = os.fspath(dst_dir)
        os.makedirs(dst_dir, exist_ok=True)
        merges = MERGES_HEADER + "\n" + "".join(f"{a} {b}\n" for a, b in self.merges)
        files = {"vocab.json": json.dumps(self.vocab, ensure_ascii=False),
                 "merges.txt": merges,
                 "tokenizer_config.json": json.dumps(self.config, indent=2, ensure_ascii=False) + "\n",
                 "special_tokens_map.json": json.dumps(self.special_tokens_map, indent=2, ensure_ascii=False) + "\n"}
        for name, text in files.items():
            atomic_write(os.path.join(dst_dir, name), lambda f, text=text: f.write(text.encode("utf-8")))
        return dst_dir

    def encode(self, prompts: Sequence[str]) -> list[list[int]]:
        """The BPE ids of each prompt, without start, end or padding tokens and not truncated."""
        return [e.ids for e in self._tokenizer.encode_batch(list(prompts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` (special tokens dropped), words separated by one space."""
        return self._tokenizer.decode(list(ids)).replace("</w>", " ").strip()

    def __call__(self, prompts: str | Sequence[str]) -> np.ndarray:
        """``[start] + ids[:max_length - 2] + [end]`` padded with the pad id: int32 ``[B, max_length]``. A
        prompt cut short is named in one warning with the number of tokens dropped."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError("prompts must be a non-empty list of strings")
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise TypeError(f"prompts[{i}] is a {type(p).__name__}, not a string")
        keep = self.max_length - 2
        out = np.full((len(prompts), self.max_length), self.pad_id, np.int32)
        cut = []
        for i, ids in enumerate(self.encode(prompts)):
            if len(ids) > keep:
                cut.append(f"prompt {i} lost {len(ids) - keep} tokens ({self.decode(ids[keep:])!r})")
                ids = ids[:keep]
            out[i, :len(ids) + 2] = [self.bos_id, *ids, self.eos_id]
        if cut:
            warnings.warn(f"CLIP reads at most {self.max_length} tokens, so the end was cut off: " + "; ".join(cut),
                          stacklevel=2)
        return out
