"""CLIP tokenizer: ids identical to transformers' CLIPTokenizer (diffusers' tokenizer) and to OpenAI
CLIP's own SimpleTokenizer on generated prompts, SD 1.x and SD 2.x padding, truncation, and the files it refuses.

The tokenizer folder is built from the BPE merges OpenAI's CLIP package ships (the layout of
openai/clip-vit-large-patch14's ``tokenizer/``); nothing is downloaded."""

import gzip
import importlib.util
import json
import os
import pathlib
import random
import warnings

import numpy as np
import pytest

from ddim_jax.tokenizer import CLIPTokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
SOT, EOT = 49406, 49407


class _OpenAIClip:
    """OpenAI CLIP's own tokenizer (``clip/simple_tokenizer.py`` of the openai-clip package, loaded on its own:
    the package's ``__init__`` imports torchvision) and ``clip.tokenize``'s framing, written out here without
    torch: ``[SOT] + ids + [EOT]``, cut to 77 with the end token kept (``truncate=True``), padded with 0."""

    def __init__(self):
        spec = importlib.util.find_spec("clip")
        if spec is None:
            pytest.skip("openai-clip is not installed")
        path = pathlib.Path(spec.submodule_search_locations[0]) / "simple_tokenizer.py"
        module_spec = importlib.util.spec_from_file_location("_openai_clip_tokenizer", path)
        self.module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(self.module)
        self.tokenizer = self.module.SimpleTokenizer()
        self.encoder = self.tokenizer.encoder

    def clean_lower(self, text: str) -> str:
        return self.module.whitespace_clean(self.module.basic_clean(text)).lower()

    def __call__(self, texts) -> np.ndarray:
        out = np.zeros((1 if isinstance(texts, str) else len(texts), 77), np.int64)
        for i, text in enumerate([texts] if isinstance(texts, str) else texts):
            ids = [SOT] + self.tokenizer.encode(text) + [EOT]
            if len(ids) > 77:
                ids = ids[:77]
                ids[-1] = EOT
            out[i, :len(ids)] = ids
        return out


def _bytes_to_unicode():
    """CLIP's table of the 256 bytes to printable characters (openai/CLIP simple_tokenizer.py)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _added_token(content):
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True, "rstrip": False,
            "single_word": False}


def _write_folder(root: pathlib.Path, vocab_json: str, merges_txt: str, pad: str) -> pathlib.Path:
    """A diffusers SD folder's ``tokenizer/``: SD 1.x and 2.x write the same config (pad ``<|endoftext|>``);
    their special_tokens_map.json differ in the pad token, which is the one transformers reads."""
    d = root / "tokenizer"
    d.mkdir(parents=True)
    (d / "vocab.json").write_text(vocab_json, encoding="utf-8")
    (d / "merges.txt").write_text(merges_txt, encoding="utf-8")
    specials = {"bos_token": _added_token("<|startoftext|>"), "eos_token": _added_token("<|endoftext|>"),
                "unk_token": _added_token("<|endoftext|>")}
    config = {**specials, "add_prefix_space": False, "do_lower_case": True, "errors": "replace",
              "model_max_length": 77, "name_or_path": "openai/clip-vit-large-patch14", "pad_token": "<|endoftext|>",
              "special_tokens_map_file": "./special_tokens_map.json", "tokenizer_class": "CLIPTokenizer"}
    (d / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (d / "special_tokens_map.json").write_text(json.dumps({**specials, "pad_token": pad}, indent=2))
    return d


@pytest.fixture(scope="module")
def simple():
    return _OpenAIClip()


@pytest.fixture(scope="module")
def folders(tmp_path_factory, simple):
    """``{"sd1": root, "sd2": root}``: SD folders whose tokenizer/ is derived from CLIP's merges."""
    with gzip.open(simple.module.default_bpe()) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]
    units = list(_bytes_to_unicode().values())
    vocab = units + [u + "</w>" for u in units] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    vocab_json = json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False)
    merges_txt = "#version: 0.2\n" + "\n".join(merges) + "\n"
    base = tmp_path_factory.mktemp("sd")
    return {"sd1": _write_folder(base / "sd1", vocab_json, merges_txt, "<|endoftext|>").parent,
            "sd2": _write_folder(base / "sd2", vocab_json, merges_txt, "!").parent}


@pytest.fixture(scope="module")
def hf(folders):
    return {k: transformers.CLIPTokenizer.from_pretrained(str(v / "tokenizer"), local_files_only=True)
            for k, v in folders.items()}


@pytest.fixture(scope="module")
def ours(folders):
    return {k: CLIPTokenizer.from_folder(v) for k, v in folders.items()}


WORDS = ["a", "photo", "of", "the", "cat", "astronaut", "riding", "horse", "on", "mars", "Portrait", "HIGHLY",
         "detailed", "4k", "octane", "render", "by", "greg", "rutkowski", "TrEnDiNg", "artstation", "x",
         "supercalifragilisticexpialidocious", "antidisestablishmentarianism", "ok", "Q", "zz"]
ACCENTED = ["café", "cafe\u0301", "naïve", "Ångström", "ÉCOLE", "résumé", "jalapeño", "straße", "İstanbul",
            "ǅemal", "ﬁne", "Ωmega", "Ελληνικά", "Привет", "ПРИВЕТ", "łódź", "ĳssel", "ḱ", "q\u0303", "a\u0308\u0301"]
SCRIPTS = ["你好世界", "東京タワー", "ｶﾀｶﾅ", "한국어", "مرحبا بالعالم", "שלום עולם", "हिन्दी", "ไทย", "ግዕዝ",
           "\u200fابن\u200f", "\u202eevil\u202c", "ＦＵＬＬＷＩＤＴＨ", "𝔣𝔯𝔞𝔨𝔱𝔲𝔯", "𝟙𝟚𝟛", "ⅷ", "①②", "٣٤٥", "߀"]
EMOJI = ["🙂", "👍🏽", "👨‍👩‍👧‍👦", "🏳️‍🌈", "🇯🇵", "1️⃣", "❤️", "🧑🏿‍🚀", "👩🏻‍❤️‍💋‍👨🏼", "🫠", "☃", "✨✨"]
PUNCT = ["!", "!!", "!!!", "?!", "...", "…", "--", "—", "(", ")", "[[", "]]", "{}", ",", ";:", "#", "@", "$$",
         "%", "^", "&&", "*", "_", "__init__", "~", "`", "|", "\\", "/", "<", ">", "<|", "|>", "'", "''", '"', "“",
         "”", "‘", "’", "«»", "¿¡", "·", "•", "°", "±", "§", "¶", "©", "®", "™", "\u00ad", "\u200b", "\x00", "\x7f"]
NUMBERS = ["0", "7", "42", "3.14159", "1,000,000", "-5", "+1", "1e10", "0x1F", "2nd", "1920x1080", "½", "²", "٣"]
CONTRACTIONS = ["it's", "don't", "you're", "I've", "I'm", "we'll", "he'd", "IT'S", "DON'T", "YOU'RE", "cat's",
                "rock'n'roll", "'s", "'t", "'re", "''s", "o'clock", "it’s", "'ll've"]
HTML = ["&amp;", "&lt;b&gt;", "&quot;hi&quot;", "&#39;", "&#x27;", "&nbsp;", "&amp;amp;", "&copy;", "&eacute;",
        "&#128512;", "<b>bold</b>", "&notanentity;", "&"]
SPACES = [" ", "  ", "\t", "\n", "\r\n", "\u00a0", "\u3000", "\u2028", "\u2009", "\u202f", "\x85", "\x0b", "\x0c",
          " \t\n ", "\u200b"]
SPECIALS = ["<|startoftext|>", "<|endoftext|>", "<|STARTOFTEXT|>", "<|EndOfText|>", "<start_of_text>", "<|endoftext"]
POOLS = [WORDS] * 6 + [ACCENTED, SCRIPTS, EMOJI, PUNCT, PUNCT, NUMBERS, CONTRACTIONS, HTML]


def _prompts(n: int = 1200, seed: int = 0) -> list[str]:
    """``n`` prompts: the pieces above alone, empty and blank strings, and random mixtures of them joined by
    assorted whitespace (or by nothing), some longer than 77 tokens."""
    rng = random.Random(seed)
    pools = (WORDS, ACCENTED, SCRIPTS, EMOJI, PUNCT, NUMBERS, CONTRACTIONS, HTML, SPECIALS)
    fixed = [p for pool in pools for p in pool]
    fixed += ["", " ", "\t\n", "\u00a0\u00a0", "a photo of an astronaut riding a horse on mars",
              "A PHOTO OF A CAT!!!", "x" * 300, "word " * 76, "word " * 75, "word " * 74, "ab" * 200,
              "🙂" * 100, "!" * 100, "a <|endoftext|> b", "<|startoftext|><|endoftext|>", "<|startoftext|> a"]
    out = list(fixed)
    while len(out) < n:
        k = rng.choice([1, 2, 3, 5, 8, 13, 21, 40, 90])
        pieces = []
        for _ in range(k):
            pieces.append(rng.choice(rng.choice(POOLS)))
            r = rng.random()
            pieces.append(" " if r < 0.6 else "" if r < 0.75 else rng.choice(SPACES))
        text = "".join(pieces)
        if rng.random() < 0.15:
            text = rng.choice(SPACES) + text
        if rng.random() < 0.05:
            text = text.replace(" ", rng.choice(SPECIALS[:4]), 1)
        out.append(text)
    return out


PROMPTS = _prompts()


def _ids(tokenizer, prompts):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tokenizer(prompts)


def test_folder_has_clip_layout(folders, simple):
    """The built files are CLIP ViT-L/14's: 49,408 tokens, 48,894 merges after a #version line, and the ids
    CLIP's own tokenizer assigns."""
    d = folders["sd1"] / "tokenizer"
    vocab = json.loads((d / "vocab.json").read_text(encoding="utf-8"))
    lines = (d / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert len(vocab) == 49408 and lines[0] == "#version: 0.2" and len(lines) == 1 + 48894
    assert vocab["<|startoftext|>"] == SOT and vocab["<|endoftext|>"] == EOT and vocab["!"] == 0
    assert simple.encoder == vocab


def test_generated_prompts_cover_the_cases():
    assert len(PROMPTS) >= 1000 and len(set(PROMPTS)) > 900
    assert "" in PROMPTS and any(len(p) > 400 for p in PROMPTS)
    for needle in ["\u200d", "\U0001F3FD", "\u00a0", "\t", "\n", "&amp;", "'s", "'t", "'re", "\u0301", "你", "ש"]:
        assert any(needle in p for p in PROMPTS), needle


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_matches_transformers(kind, hf, ours):
    """Every id, special tokens, truncation and padding included, is transformers' (diffusers' tokenizer)."""
    ref = np.asarray(hf[kind](PROMPTS, padding="max_length", max_length=77, truncation=True).input_ids)
    got = _ids(ours[kind], PROMPTS)
    assert got.dtype == np.int32 and got.shape == (len(PROMPTS), 77)
    bad = [i for i in range(len(PROMPTS)) if not np.array_equal(ref[i], got[i])]
    assert not bad, f"{len(bad)} prompts differ, first {PROMPTS[bad[0]]!r}: {ref[bad[0]]} != {got[bad[0]]}"
    pad = {"sd1": EOT, "sd2": 0}[kind]
    assert ours[kind].pad_id == pad
    assert (ref[:, 0] == SOT).all() and (ref[:, -1] == pad).sum() > 100 and (ref[:, -1] == EOT).sum() > 10


def test_matches_openai_clip(ours, simple):
    """CLIP's SimpleTokenizer (OpenAI's; OpenCLIP, whose ViT-H is SD 2.x's text model, uses a copy of it) cleans
    the text first: ftfy.fix_text, html.unescape twice, whitespace runs to one space, lower case. transformers
    (and so this tokenizer) does NFC, whitespace and lower case only; on CLIP's cleaned text the two agree.
    Compared where they mean the same thing: CLIP pads with 0 (SD 2.x's pad), its special-token literals are
    left out (transformers matches them by other rules), and it reads ``!`` as 256 where an SD 2.x folder, whose
    pad token is ``!``, reads it as 0."""
    literals = ("<|startoftext|>", "<|endoftext|>", "<start_of_text>", "<end_of_text>")  # special to one side only
    candidates = [p for p in PROMPTS if not any(s in p.lower() for s in literals)]
    cleaned = [simple.clean_lower(p) for p in candidates]
    ref = simple(candidates)
    got1 = _ids(ours["sd1"], cleaned)
    after_end = np.cumsum(ref == EOT, axis=1) - (ref == EOT) > 0
    ref_sd1 = np.where(after_end, EOT, ref)  # CLIP's ids, padded as SD 1.x folders pad
    bad = [i for i in range(len(cleaned)) if not np.array_equal(ref_sd1[i], got1[i])]
    assert len(cleaned) > 900 and not bad, f"{len(bad)} differ, first {candidates[bad[0]]!r}"
    no_bang = [i for i, c in enumerate(cleaned) if "!" not in c]
    got2 = _ids(ours["sd2"], [cleaned[i] for i in no_bang])
    assert len(no_bang) > 500 and np.array_equal(got2, ref[no_bang])
    # The cleaning is where the two differ: the same raw prompts give other ids here.
    raw = _ids(ours["sd1"], candidates)
    assert not np.array_equal(raw, ref_sd1)


def test_openai_clip_differences_are_the_cleaning_and_the_sd2_pad(ours, simple):
    for prompt in ["&amp; it’s ｆｕｌｌ", "caf\u00c3\u00a9"]:  # html, curly quote, full width; mojibake
        assert not np.array_equal(_ids(ours["sd1"], prompt)[0, :8], simple(prompt)[0, :8])
    assert list(_ids(ours["sd2"], "hi!")[0, :4]) == [SOT, 1883, 0, EOT]  # "!" matched as the pad token
    assert list(simple("hi!")[0, :4]) == [SOT, 1883, 256, EOT]
    assert list(_ids(ours["sd1"], "hi!")[0, :4]) == [SOT, 1883, 256, EOT]


def test_from_folder_reads_the_pad_token_from_the_files(folders, tmp_path):
    """The pad token is the folder's, whatever the model: a folder whose config lists added_tokens_decoder
    (newer transformers saves) takes its tokens from the config, as transformers does."""
    config = json.loads((folders["sd1"] / "tokenizer" / "tokenizer_config.json").read_text())
    config.update(pad_token="!", added_tokens_decoder={})
    d = _copy(folders, tmp_path, "tokenizer_config.json", json.dumps(config)) / "tokenizer"
    assert CLIPTokenizer.from_folder(tmp_path).pad_id == 0
    assert transformers.CLIPTokenizer.from_pretrained(str(d), local_files_only=True).pad_token_id == 0
    assert CLIPTokenizer.from_folder(d).pad_id == 0  # the tokenizer/ folder itself


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_save_round_trip(kind, folders, ours, tmp_path):
    dst = pathlib.Path(ours[kind].save(tmp_path / "model" / "tokenizer"))
    assert sorted(p.name for p in dst.iterdir()) == sorted(
        ["vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"])
    assert (dst / "merges.txt").read_text(encoding="utf-8").splitlines()[0] == "#version: 0.2"
    prompts = PROMPTS[::7]
    back = CLIPTokenizer.from_folder(tmp_path / "model")
    ref = transformers.CLIPTokenizer.from_pretrained(str(dst), local_files_only=True)
    assert np.array_equal(_ids(back, prompts), _ids(ours[kind], prompts))
    assert np.array_equal(np.asarray(ref(prompts, padding="max_length", max_length=77, truncation=True).input_ids),
                          _ids(back, prompts))


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_a_folder_saved_by_transformers_5_reads_the_same(kind, hf, tmp_path):
    """transformers 5 saves a CLIP tokenizer as tokenizer.json (the BPE, the added tokens' flags) and
    tokenizer_config.json (the special tokens' names): an SD folder re-saved with it still converts."""
    hf[kind].save_pretrained(str(tmp_path / "tokenizer"))
    assert sorted(p.name for p in (tmp_path / "tokenizer").iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    back = CLIPTokenizer.from_folder(tmp_path)
    prompts = PROMPTS[::3]
    ref = hf[kind](prompts, padding="max_length", max_length=77, truncation=True).input_ids
    assert back.pad_id == {"sd1": EOT, "sd2": 0}[kind]
    assert np.array_equal(_ids(back, prompts), np.asarray(ref))


def test_from_files(folders, ours):
    d = folders["sd2"] / "tokenizer"
    tok = CLIPTokenizer.from_files(d / "vocab.json", d / "merges.txt", pad_token="!")
    assert tok.max_length == 77 and tok.pad_id == 0
    assert np.array_equal(_ids(tok, PROMPTS[::5]), _ids(ours["sd2"], PROMPTS[::5]))


def test_call_shapes_and_bad_prompts(ours):
    tok = ours["sd1"]
    single = tok("a cat")
    assert single.shape == (1, 77) and single.dtype == np.int32
    assert np.array_equal(single, tok(["a cat"])) and np.array_equal(tok(("a", "b")), tok(["a", "b"]))
    assert list(tok("")[0, :3]) == [SOT, EOT, EOT]
    for bad in ([], (), None, 3):
        with pytest.raises(ValueError, match="prompts must be a non-empty list of strings"):
            tok(bad)
    with pytest.raises(TypeError, match=r"prompts\[1\] is a int"):
        tok(["a", 1])
    with pytest.raises(TypeError, match=r"prompts\[2\] is a bytes"):
        tok(["a", "b", b"c"])


def test_truncation_warns_once_with_the_count(ours, hf):
    tok = ours["sd1"]
    long_prompt = "a photo of an astronaut riding a horse on mars, " * 10
    n = len(hf["sd1"](long_prompt, add_special_tokens=False).input_ids)
    assert n > 75
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ids = tok([long_prompt, "a cat", long_prompt[:100]])
    assert len(caught) == 1, [str(w.message) for w in caught]
    message = str(caught[0].message)
    assert f"prompt 0 lost {n - 75} tokens" in message and "prompt 1" not in message and "prompt 2" not in message
    assert "\n" not in message and caught[0].filename == __file__
    assert ids[0, -1] == EOT and ids[0, 0] == SOT
    exact = "word " * 75  # 75 tokens: fits, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tok(exact)[0, -1] == EOT
    with pytest.warns(UserWarning, match="prompt 0 lost 1 tokens"):
        tok(exact + "word")


def _copy(folders, tmp_path, name, text=None):
    """``tmp_path`` as an SD folder whose tokenizer/ links to the SD 1.x files, except ``name``: written with
    ``text``, or left out when ``text`` is None."""
    src, d = folders["sd1"] / "tokenizer", tmp_path / "tokenizer"
    d.mkdir()
    for f in src.iterdir():
        if f.name != name:
            (d / f.name).symlink_to(f)
    if text is not None:
        (d / name).write_text(text, encoding="utf-8")
    return tmp_path


@pytest.mark.parametrize("name", ["vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"])
def test_missing_file_is_named(name, folders, tmp_path):
    root = _copy(folders, tmp_path, name)
    with pytest.raises(FileNotFoundError, match=rf"tokenizer/{name} is missing"):
        CLIPTokenizer.from_folder(root)


@pytest.mark.parametrize("name,text,match", [
    ("vocab.json", "{not json", r"vocab.json is not valid JSON"),
    ("vocab.json", "[1, 2]", r"vocab.json holds a JSON list"),
    ("vocab.json", '{"a": "1"}', r"vocab.json maps 'a' to '1'"),
    ("vocab.json", '{"a": 1, "b": 1}', r"vocab.json gives two tokens the same id"),
    ("vocab.json", '{"a": 0, "<|startoftext|>": 1}', r"eos_token '<\|endoftext\|>' is not in .*vocab.json"),
    ("merges.txt", "#version: 0.2\na b c\n", r"merges.txt line 2 is not a merge"),
    ("merges.txt", "#version: 0.2\n", r"merges.txt holds no merges"),
    ("merges.txt", "#version: 0.2\nzzz\u4e00 qqq\u4e01\n", r"merges.txt and vocab.json do not make a BPE"),
    ("tokenizer_config.json", '{"model_max_length": 1e30}', r"tokenizer_config.json: model_max_length is 1e\+30"),
    ("tokenizer_config.json", '{"tokenizer_class": "T5Tokenizer"}', r"tokenizer_class 'T5Tokenizer'"),
    ("special_tokens_map.json", '{"pad_token": 7}', r"special_tokens_map.json: pad_token is 7, not a token"),
    ("special_tokens_map.json", '{"pad_token": "nope-not-a-token"}', r"pad_token 'nope-not-a-token' is not in"),
])
def test_malformed_file_is_named(name, text, match, folders, tmp_path):
    root = _copy(folders, tmp_path, name, text)
    with pytest.raises(ValueError, match=match) as e:
        CLIPTokenizer.from_folder(root)
    assert "\n" not in str(e.value)


def test_unknown_layouts_are_refused(tmp_path, folders):
    only_json = tmp_path / "a" / "tokenizer"
    only_json.mkdir(parents=True)
    (only_json / "tokenizer.json").write_text('{"model": {"type": "Unigram", "vocab": []}}')
    (only_json / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"tokenizer/tokenizer.json does not hold CLIP's BPE .* 'Unigram'"):
        CLIPTokenizer.from_folder(only_json.parent)
    (only_json / "tokenizer_config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"tokenizer_config.json is missing \(beside tokenizer.json"):
        CLIPTokenizer.from_folder(only_json.parent)
    spm = tmp_path / "b" / "tokenizer"
    spm.mkdir(parents=True)
    (spm / "spiece.model").write_bytes(b"\x00")
    with pytest.raises(ValueError, match=r"spiece.model is a sentencepiece model"):
        CLIPTokenizer.from_folder(spm.parent)
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        CLIPTokenizer.from_folder(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="vocab.json is missing"):
        CLIPTokenizer.from_folder(tmp_path)  # no tokenizer files at all
