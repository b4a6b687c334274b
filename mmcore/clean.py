"""Clean: read the manifest, map its columns, normalise captions and quarantine bad rows.

Vectorised with pyarrow compute and pandas; only rows that need it go through ftfy (non-ASCII
text) or ``html.unescape`` (text with ``&``), so a million rows take seconds.
"""

from __future__ import annotations

import codecs
import csv
import functools
import html
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import ftfy
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from pydantic import Field, model_validator

from mmcore import ingest, tables
from mmcore.base import DataConfig, StageContext, StrictModel
from mmcore.errors import InputError
from mmcore.registry import Registry
from mmcore.tables import DOMAIN, GROUP, IMAGE, LABEL, ROW_ID, TEXT, TEXT_RAW, TIME, StageResult

STAGE = "clean"

# Reason codes, in the order the checks run (a row gets the first it fails).
# The input forms' own reasons come first (``mmcore.ingest``: a failed download, an unsafe tar member, ...).
REASONS = {
    **{k: v for k, v in ingest.REASONS.items() if k != "invalid_encoding"},
    "invalid_encoding": "a cell of the row is not valid UTF-8 (the undecodable bytes read as U+FFFD)",
    "empty_image_path": "the image path is empty or missing",
    "empty_caption": "the caption is empty or only whitespace",
    "caption_too_short": "fewer than clean.min_chars characters or clean.min_words words",
    "caption_too_long": "more than clean.max_chars characters",
    "non_text_caption": "letters are less than clean.min_letter_fraction of the characters",
    "repetitive_caption": "distinct words are less than clean.min_unique_word_ratio of the words",
    "wrong_language": "the caption's language (langid) is not in clean.languages, or below clean.min_language_confidence",
    "invalid_time": "the time column is not an ISO-8601 timestamp",
    "duplicate_pair": "same image path and caption as an earlier row (the first is kept)",
}


class CleanConfig(StrictModel):
    """Caption thresholds; defaults follow common web-scale practice (LAION/DataComp text rules)."""

    min_chars: int = Field(5, ge=0, description="Shorter captions are quarantined as caption_too_short.")
    min_words: int = Field(2, ge=0, description="Captions with fewer words are caption_too_short.")
    max_chars: int = Field(1000, ge=1, description="Longer captions are caption_too_long.")
    min_letter_fraction: float = Field(0.5, ge=0, le=1, description="Letters (any script) / characters.")
    min_unique_word_ratio: float = Field(0.35, ge=0, le=1, description="Distinct words / words, for long captions.")
    repetition_min_words: int = Field(6, ge=1, description="The repetition check applies from this many words.")
    fix_text: bool = Field(True, description="Repair mojibake with ftfy and unescape HTML entities.")
    languages: list[str] = Field(
        default_factory=list, description="Keep captions langid identifies as one of these ISO 639-1 codes; [] = all."
    )
    min_language_confidence: float = Field(
        0.0, ge=0, le=1, description="With languages: also drop captions whose language probability is lower."
    )
    keep_uncaptioned: bool = Field(
        False, description="Keep rows whose caption is empty (text \"\") through the safety stages, for the pseudo "
        "stage to caption (train) or quarantine (val, test); off: empty_caption."
    )

    @model_validator(mode="after")
    def _bounds(self) -> CleanConfig:
        if self.max_chars < self.min_chars:
            raise ValueError(f"max_chars ({self.max_chars}) must be >= min_chars ({self.min_chars})")
        return self


# --------------------------------------------------------------------------- manifest


@dataclass(frozen=True)
class Reader:
    """One manifest format: ``read(path)`` gives the table, ``columns(path)`` its column names from
    the header alone (None: read the whole table)."""

    read: Callable[[Path], pd.DataFrame]
    columns: Callable[[Path], list[str]] | None = None


# Manifest readers by lower-case file suffix; ``data.manifest``'s suffix picks one.
READERS: Registry[Reader] = Registry("format", error=InputError, unknown="unsupported")


# A column the readers add: why a row's bytes did not decode ("" when they did). clean.run turns it
# into the reason invalid_encoding and drops it; a manifest may not have a column of that name.
BAD_BYTES = "_mmpipe_invalid_encoding"
# pyarrow parses CSV in blocks (1 MB by default) and refuses a row longer than one: a bigger block,
# and the whole file as one block when a row is longer still (caption_too_long then catches it).
_CSV_BLOCK = 16 << 20
_MAX_BLOCK = (1 << 31) - 1


def _no_duplicates(names: list[str], path: Path) -> list[str]:
    dups = sorted({n for n in names if names.count(n) > 1})
    if dups:
        raise InputError(f"data.manifest: duplicate column names {', '.join(map(repr, dups))} in {path}; "
                         "expected each column name once")
    return names


def _header(path: Path, delimiter: str) -> list[str]:
    # utf-8-sig: Excel's "CSV UTF-8" starts with a byte-order mark, which is not part of the first name.
    with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
        return _no_duplicates(next(csv.reader(f, delimiter=delimiter), []), path)


def _utf8(col: pa.ChunkedArray) -> tuple[pa.ChunkedArray, np.ndarray | None]:
    """A binary or string column as valid UTF-8 strings, and which rows had undecodable bytes (None: none)."""
    large = pa.types.is_large_string(col.type) or pa.types.is_large_binary(col.type)
    target = pa.large_string() if large else pa.string()
    try:
        if pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type):
            return col.cast(target), None  # the cast validates UTF-8
        col.validate(full=True)
        return col, None
    except pa.ArrowInvalid:
        pass
    # Only a column that failed pays for decoding cell by cell.
    values = col.cast(pa.large_binary() if large else pa.binary()).to_pylist()
    bad = np.zeros(len(values), bool)
    out: list[str | None] = []
    for i, b in enumerate(values):
        try:
            out.append(None if b is None else b.decode("utf-8"))
        except UnicodeDecodeError:
            out.append(b.decode("utf-8", "replace"))
            bad[i] = True
    return pa.chunked_array([pa.array(out, target)], target), bad


def _from_arrow(t: pa.Table, path: Path) -> pd.DataFrame:
    """The table as pandas, its text columns decoded; rows with undecodable bytes say so in ``BAD_BYTES``."""
    _no_duplicates(t.column_names, path)
    why = np.full(t.num_rows, "", dtype=object)
    for i, name in enumerate(t.column_names):
        col = t.column(i)
        if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type) or pa.types.is_binary(col.type)
                or pa.types.is_large_binary(col.type)):
            continue
        col, bad = _utf8(col)
        t = t.set_column(i, name, col)
        if bad is not None:
            why[bad & (why == "")] = f"invalid UTF-8 in column {name!r}"
    df = t.to_pandas()
    if (why != "").any():
        df[BAD_BYTES] = pd.Series(why, dtype="str")
    return df


def _read_delimited(path: Path, delimiter: str) -> pd.DataFrame:
    """CSV-style text (quotes as Excel and pandas write them) split on ``delimiter``."""
    header = _header(path, delimiter)
    if not header:
        raise InputError(f"manifest {path} is empty; expected a header row")
    # Every column as bytes (decoded per column, bad cells per row), empty cells as "", so "NA"
    # captions and ids keep their text.
    convert = pacsv.ConvertOptions(column_types={c: pa.binary() for c in header}, strings_can_be_null=False)
    parse = pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=True)
    try:
        t = pacsv.read_csv(path, pacsv.ReadOptions(block_size=_CSV_BLOCK), parse, convert)
    except pa.ArrowInvalid as e:
        if "straddl" not in str(e):
            raise
        block = min(max(path.stat().st_size + 1, _CSV_BLOCK), _MAX_BLOCK)
        t = pacsv.read_csv(path, pacsv.ReadOptions(block_size=block), parse, convert)
    return _from_arrow(t, path)


def _delimited(delimiter: str) -> Reader:
    return Reader(functools.partial(_read_delimited, delimiter=delimiter), functools.partial(_header, delimiter=delimiter))


def _read_parquet(path: Path) -> pd.DataFrame:
    # Parquet does not validate UTF-8 on write: a string column may hold any bytes.
    _parquet_columns(path)  # duplicate names fail pyarrow's read with a less helpful message
    return _from_arrow(pq.read_table(path), path)


def _parquet_columns(path: Path) -> list[str]:
    return _no_duplicates(list(pq.read_schema(path).names), path)


def _read_jsonl(path: Path) -> pd.DataFrame:
    """One JSON object per line (``.json`` too: a manifest is a stream of records)."""
    raw = path.read_bytes().removeprefix(codecs.BOM_UTF8)
    try:
        return pd.read_json(io.StringIO(raw.decode("utf-8")), lines=True, dtype=False, convert_dates=False)
    except UnicodeDecodeError:
        pass
    lines = [ln for ln in raw.split(b"\n") if ln.strip()]
    why = []
    for ln in lines:
        try:
            ln.decode("utf-8")
            why.append("")
        except UnicodeDecodeError:
            why.append("invalid UTF-8 in the line")
    text = "\n".join(ln.decode("utf-8", "replace") for ln in lines)
    df = pd.read_json(io.StringIO(text), lines=True, dtype=False, convert_dates=False)
    df[BAD_BYTES] = pd.Series(why, index=df.index, dtype="str")
    return df


_PARQUET, _JSONL = Reader(_read_parquet, _parquet_columns), Reader(_read_jsonl)
READERS.register(".csv", _delimited(","))
READERS.register(".tsv", _delimited("\t"))
READERS.register(".parquet", _PARQUET)
READERS.register(".pq", _PARQUET)
READERS.register(".jsonl", _JSONL)
READERS.register(".ndjson", _JSONL)
READERS.register(".json", _JSONL)


def _manifest_file(data: DataConfig) -> tuple[Path, Reader]:
    path = Path(data.manifest)
    if not path.is_file():
        raise InputError(f"data.manifest: file not found: {path}")
    return path, READERS.get(path.suffix.lower(), where=f"data.manifest ({path})")


def _unparsable(path: Path, e: Exception) -> InputError:
    """A parser's own message, made one line."""
    return InputError(f"data.manifest: cannot parse {path}: {str(e).strip().splitlines()[0]}")


def read_manifest(data: DataConfig) -> pd.DataFrame:
    """Read the input and give every row its ``row_id``: the manifest with the reader its suffix names
    in ``READERS``, or, for another ``data.format``, what ``ingest.read`` gives (shards, Parquet with
    bytes, COCO or Karpathy captions)."""
    if data.format != "manifest":
        df = ingest.read(data)
        df = (_from_arrow(df, data.image_root) if isinstance(df, pa.Table) else df).reset_index(drop=True)
        df.insert(0, ROW_ID, np.arange(len(df), dtype=np.int64))
        return df
    path, reader = _manifest_file(data)
    try:
        df = reader.read(path)
    except InputError:
        raise
    except Exception as e:
        raise _unparsable(path, e) from None
    df = df.reset_index(drop=True)
    _no_duplicates([str(c) for c in df.columns], path)
    if ROW_ID in df.columns:
        raise InputError(f"data.manifest: column {ROW_ID!r} is reserved for mmpipe ({path}); rename it")
    df.insert(0, ROW_ID, np.arange(len(df), dtype=np.int64))
    return df


# The graph's hook for the stage that starts from the manifest (``execute.read_source``).
read_input = read_manifest


def manifest_columns(data: DataConfig) -> list[str]:
    """The manifest's column names, read from its header only where the format allows (for checks before a run)."""
    if data.format != "manifest":
        return ingest.columns(data)
    path, reader = _manifest_file(data)
    if reader.columns is None:
        return [c for c in read_manifest(data).columns if c not in (ROW_ID, BAD_BYTES)]
    try:
        return reader.columns(path)
    except InputError:
        raise
    except Exception as e:
        raise _unparsable(path, e) from None


_COLUMN_KEYS = ("image_column", "text_column", "group_column", "time_column", "label_column", "domain_column")


def _column_keys(data: DataConfig) -> tuple[str, ...]:
    """The ``data.*_column`` keys that name a column of the input table (the other forms make their own
    image and text columns; coco and karpathy their group)."""
    if data.format == "manifest":
        return _COLUMN_KEYS
    return tuple(k for k in _COLUMN_KEYS[2:] if not (k == "group_column" and data.format in ("coco", "karpathy")))


def _input_name(data: DataConfig) -> str:
    if data.format == "manifest":
        return f"manifest {data.manifest}"
    return f"the {data.format} input {data.shards if data.shards is not None else data.manifest}"


def check_columns(data: DataConfig, columns: list[str] | None = None) -> None:
    """Fail, in one line, if a configured column is not in the manifest (header only by default)."""
    cols = [c for c in (manifest_columns(data) if columns is None else columns) if c != ROW_ID]
    for key in _column_keys(data):
        name = getattr(data, key)
        if name is not None and name not in cols:
            raise InputError(
                f"data.{key}: column {name!r} not in {_input_name(data)}; got {', '.join(map(repr, cols))}"
            )


def _as_text(s: pd.Series, *, keep_null: bool) -> pd.Series:
    """Any column as pandas' string dtype (mixed JSON values become their text)."""
    null = s.isna()
    out = s.astype("object").where(null, s.astype(str)) if s.dtype == object else s.astype("str")
    out = out.astype("str")
    if keep_null:
        return out.where(~null, None)
    return out.where(~null, "")


def map_columns(df: pd.DataFrame, data: DataConfig) -> pd.DataFrame:
    """Rename the configured columns to mmpipe's canonical names and fix their types."""
    check_columns(data, list(df.columns))
    mapping = data.column_map()
    for key in _column_keys(data):
        user, canon = getattr(data, key), mapping.get(getattr(data, key))
        if user is not None and canon in df.columns and canon != user and canon not in mapping:
            raise InputError(
                f"data.{key}: manifest has both {user!r} and {canon!r}; rename {canon!r} "
                f"(mmpipe's name for the {key.removesuffix('_column')} column)"
            )
    df = df.rename(columns=mapping)
    for col in df.columns:
        if col == ROW_ID or col == TIME:
            continue
        if col in (IMAGE, TEXT):
            df[col] = _as_text(df[col], keep_null=False)
        elif col in (GROUP, LABEL, DOMAIN) or df[col].dtype == object:
            df[col] = _as_text(df[col], keep_null=True)
    return df


# --------------------------------------------------------------------------- caption language

# Columns the language check adds: langid's ISO 639-1 code and its normalised probability.
LANG = "lang"
LANG_CONFIDENCE = "lang_confidence"


@functools.lru_cache(maxsize=1)
def _language_identifier():
    """langid's bundled model (97 languages, offline), with probabilities normalised to sum to 1."""
    from langid.langid import LanguageIdentifier, model

    return LanguageIdentifier.from_modelstring(model, norm_probs=True)


def identify_language(text: pd.Series, chunk: int = 512) -> tuple[pd.Series, pd.Series]:
    """langid's language and its probability per caption, as ``langid.classify`` gives them.

    Each distinct caption once, and langid's naive Bayes product as one matrix product per chunk
    (``classify`` costs ~10 ms a call: its dot product of an int vector misses BLAS).
    """
    ident = _language_identifier()
    codes, uniques = pd.factorize(text.astype("str").fillna(""))
    classes = np.asarray(ident.nb_classes, dtype=object)
    ptc, pc_ = np.asarray(ident.nb_ptc, np.float32), np.asarray(ident.nb_pc, np.float64)
    lang = np.empty(len(uniques), dtype=object)
    conf = np.empty(len(uniques), dtype=np.float64)
    for a in range(0, len(uniques), chunk):
        fv = np.stack([ident.instance2fv(u) for u in uniques[a : a + chunk]]).astype(np.float32)
        logp = (fv @ ptc).astype(np.float64) + pc_
        logp -= logp.max(axis=1, keepdims=True)
        p = np.exp(logp)
        p /= p.sum(axis=1, keepdims=True)
        best = p.argmax(axis=1)
        lang[a : a + chunk], conf[a : a + chunk] = classes[best], p[np.arange(len(best)), best]
    return (pd.Series(lang[codes], index=text.index, dtype="str"),
            pd.Series(conf[codes], index=text.index, dtype=np.float64))


# --------------------------------------------------------------------------- captions


_SPACE_RE = r"[\x00-\x1f\x7f\p{Zs}\x{200b}\x{feff}]+"
_UNSPACED = r"[\p{Han}\p{Hiragana}\p{Katakana}\p{Thai}\p{Lao}\p{Khmer}\p{Myanmar}]"


def _utf8_bytes(arr: pa.StringArray) -> tuple[np.ndarray, np.ndarray]:
    """The UTF-8 bytes of a string array and each string's offsets (nulls read as empty)."""
    arr = pc.fill_null(arr, "")
    _, offsets, data = arr.buffers()
    # Offsets index the whole data buffer; a sliced array starts at arr.offset.
    off = np.frombuffer(offsets, np.int32)[arr.offset : arr.offset + len(arr) + 1]
    data = np.frombuffer(data, np.uint8) if data is not None else np.zeros(0, np.uint8)
    return data[: off[-1]], off


def _count_per_string(mask: np.ndarray, off: np.ndarray) -> np.ndarray:
    """How many bytes of each string are set in a byte mask."""
    # A trailing 0 so that empty strings at the end have a valid start.
    out = np.add.reduceat(np.append(mask, False), off[:-1], dtype=np.int64)
    out[off[1:] == off[:-1]] = 0  # reduceat reads one element for an empty string
    return out


def _on_rows(arr: pa.StringArray, mask: np.ndarray, fn) -> pa.StringArray:
    """``fn`` applied to the rows in ``mask`` only."""
    if not mask.any():
        return arr
    return pc.replace_with_mask(arr, pa.array(mask), fn(arr.filter(pa.array(mask))))


def _fix_subset(text: pd.Series, mask: pd.Series, fn) -> tuple[pd.Series, int]:
    if not mask.any():
        return text, 0
    # Once per distinct caption: web captions repeat, and ftfy costs ~0.2 ms a call.
    sub = text[mask]
    fixed = sub.map({u: fn(u) for u in pd.unique(sub)})
    n = int((fixed != text[mask]).sum())
    text = text.copy()
    text[mask] = fixed
    return text, n


def normalize_captions(text: pd.Series, fix_text: bool = True) -> tuple[pd.Series, dict[str, int]]:
    """ftfy for mojibake, HTML entities unescaped, control characters dropped, whitespace collapsed.

    Non-Latin scripts are left as they are: ftfy only repairs text that decodes as mojibake.
    """
    counts = {"n_ftfy_fixed": 0, "n_html_unescaped": 0}
    if fix_text:
        arr = pa.array(text, type=pa.string())
        non_ascii = pd.Series(np.asarray(pc.invert(pc.string_is_ascii(arr)).fill_null(False)), index=text.index)
        text, counts["n_ftfy_fixed"] = _fix_subset(text, non_ascii, lambda s: ftfy.fix_text(s, unescape_html=False))
        has_amp = pd.Series(np.asarray(pc.match_substring(arr, "&").fill_null(False)), index=text.index)
        text, counts["n_html_unescaped"] = _fix_subset(text, has_amp, html.unescape)
    arr = tables.string_array(text)
    # The regexes can only change rows with a non-ASCII byte, a control character or two spaces
    # in a row; the others (nearly all) only need trimming. RE2 over every row costs seconds.
    data, off = _utf8_bytes(arr)
    odd = (data >= 0x80) | (data < 0x20) | (data == 0x7F)
    odd[:-1] |= (data[:-1] == 0x20) & (data[1:] == 0x20)
    arr = _on_rows(
        arr,
        _count_per_string(odd, off) > 0,
        lambda a: pc.replace_substring_regex(pc.replace_substring_regex(a, _SPACE_RE, " "), r"\s+", " "),
    )
    arr = pc.utf8_trim_whitespace(arr)
    return pd.Series(arr.to_pandas(), index=text.index).astype("str"), counts


def _caption_features(text: pd.Series) -> dict[str, np.ndarray]:
    arr = tables.string_array(text)
    n = len(arr)
    n_chars = pc.utf8_length(arr).fill_null(0).to_numpy(zero_copy_only=False)
    # Letters: a byte test for ASCII rows; the Unicode regexes (slow) only on the other rows.
    data, off = _utf8_bytes(arr)
    low = data | 0x20
    n_letters = _count_per_string((low >= ord("a")) & (low <= ord("z")), off)
    n_unspaced = np.zeros(n, np.int64)
    non_ascii = np.flatnonzero(np.asarray(pc.invert(pc.string_is_ascii(arr)).fill_null(False)))
    if non_ascii.size:
        sub = arr.take(pa.array(non_ascii))
        n_letters[non_ascii] = pc.count_substring_regex(sub, r"[\pL\pM]").to_numpy(zero_copy_only=False)
        # Scripts written without spaces (CJK, Thai, ...) count one word per character, so a
        # Chinese caption is not "too short" for having no spaces.
        n_unspaced[non_ascii] = pc.count_substring_regex(sub, _UNSPACED).to_numpy(zero_copy_only=False)
    words = pc.utf8_split_whitespace(pc.utf8_lower(arr))
    n_tokens = pc.list_value_length(words).fill_null(0).to_numpy(zero_copy_only=False)
    # Distinct words per caption: code each word (one hash pass), sort the (caption, code) keys
    # (already grouped by caption) and count the first of each run.
    codes = pc.dictionary_encode(pc.list_flatten(words)).indices.to_numpy(zero_copy_only=False).astype(np.int64)
    k = int(codes.max()) + 1 if codes.size else 1
    key = pc.list_parent_indices(words).to_numpy(zero_copy_only=False).astype(np.int64) * k + codes
    key.sort()
    first = np.ones(key.size, bool)
    first[1:] = key[1:] != key[:-1]
    return {
        "n_chars": n_chars,
        "n_letters": n_letters,
        "n_words": np.maximum(n_tokens, n_unspaced),
        "n_tokens": n_tokens,
        "n_unique": np.bincount(key[first] // k, minlength=n),
    }


# A caption more than this many times clean.max_chars long (before normalisation) is too long unread.
_RAW_LENGTH_FACTOR = 16


def run(table: pd.DataFrame, cfg: CleanConfig, ctx: StageContext) -> StageResult:
    """Map columns, normalise captions, and quarantine rows with the reasons in ``REASONS``."""
    bad_bytes = table[BAD_BYTES].fillna("").astype("str") if BAD_BYTES in table.columns else None
    # The input form's own reasons (ingest), checked before any caption rule.
    own = ctx.data.format != "manifest" and ingest.REASON in table.columns  # never a manifest's own column
    why = table[ingest.REASON].fillna("").astype("str") if own else None
    why_detail = table[ingest.DETAIL].fillna("").astype("str") if own else None
    if why is not None and (why == "invalid_encoding").any():
        bad = why == "invalid_encoding"
        bad_bytes = (bad_bytes if bad_bytes is not None else pd.Series("", index=table.index, dtype="str")).where(
            ~bad, why_detail)
        why = why.where(~bad, "")
    df = map_columns(table.drop(columns=[BAD_BYTES, *((ingest.REASON, ingest.DETAIL) if own else ())], errors="ignore"),
                     ctx.data)
    df.insert(df.columns.get_loc(TEXT) + 1, TEXT_RAW, df[TEXT])
    # Length first: normalising a 50 MB caption (ftfy) takes minutes. Normalisation only drops
    # control characters and repeated spaces, so a caption this far over max_chars stays too long;
    # only its head is normalised (text_raw keeps it whole).
    raw_chars = pd.Series(pc.utf8_length(tables.string_array(df[TEXT])).fill_null(0).to_numpy(zero_copy_only=False), df.index)
    raw_too_long = raw_chars > _RAW_LENGTH_FACTOR * cfg.max_chars
    if raw_too_long.any():
        df.loc[raw_too_long, TEXT] = df.loc[raw_too_long, TEXT].str.slice(0, _RAW_LENGTH_FACTOR * cfg.max_chars)
    df[TEXT], fix_counts = normalize_captions(df[TEXT], cfg.fix_text)
    df[IMAGE] = df[IMAGE].str.strip()

    f = _caption_features(df[TEXT])
    idx = df.index
    n_chars, n_words = pd.Series(f["n_chars"], idx), pd.Series(f["n_words"], idx)
    letter_frac = pd.Series(f["n_letters"] / np.maximum(f["n_chars"], 1), idx)
    n_tokens = pd.Series(f["n_tokens"], idx)
    unique_ratio = pd.Series(f["n_unique"] / np.maximum(f["n_tokens"], 1), idx)

    time_bad = pd.Series(False, index=idx)
    if TIME in df.columns:
        raw_time = df[TIME]
        df[TIME] = pd.to_datetime(raw_time.astype("str"), utc=True, errors="coerce", format="ISO8601")
        time_bad = df[TIME].isna()

    df[LANG], df[LANG_CONFIDENCE] = identify_language(df[TEXT])
    wrong_language = (
        ~df[LANG].isin(cfg.languages) | (df[LANG_CONFIDENCE] < cfg.min_language_confidence)
        if cfg.languages else pd.Series(False, index=idx)
    )

    key = df[IMAGE] + "\x00" + df[TEXT].str.casefold()
    empty_text = n_chars == 0
    # Kept uncaptioned rows carry text "" (what marks them to quality and pseudo); no caption rule applies.
    keep_empty = empty_text if cfg.keep_uncaptioned else pd.Series(False, index=idx)
    if cfg.keep_uncaptioned:
        df.loc[keep_empty, TEXT] = ""
        wrong_language = wrong_language & ~keep_empty
    if bad_bytes is None:
        bad_bytes = pd.Series("", index=idx, dtype="str")
    if why is None:
        why, why_detail = pd.Series("", index=idx, dtype="str"), pd.Series("", index=idx, dtype="str")
    checks = [
        *((code, pd.Series(why.to_numpy() == code, idx), pd.Series(why_detail.to_numpy(), idx))
          for code in ingest.REASONS if code != "invalid_encoding"),
        ("invalid_encoding", pd.Series(bad_bytes.to_numpy() != "", idx), pd.Series(bad_bytes.to_numpy(), idx)),
        ("empty_image_path", df[IMAGE] == "", "image path is empty"),
        ("empty_caption", empty_text & ~keep_empty, "caption is empty after normalisation"),
        (
            "caption_too_short",
            ((n_chars < cfg.min_chars) | (n_words < cfg.min_words)) & ~keep_empty,
            n_chars.astype(str) + " chars, " + n_words.astype(str) + " words",
        ),
        (
            "caption_too_long",
            (n_chars > cfg.max_chars) | raw_too_long,
            n_chars.where(~raw_too_long, raw_chars).astype(str) + " chars > " + str(cfg.max_chars),
        ),
        (
            "non_text_caption",
            (letter_frac < cfg.min_letter_fraction) & ~keep_empty,
            "letter fraction " + letter_frac.round(2).astype(str),
        ),
        (
            "repetitive_caption",
            (n_tokens >= cfg.repetition_min_words) & (unique_ratio < cfg.min_unique_word_ratio),
            "distinct word ratio " + unique_ratio.round(2).astype(str),
        ),
        ("wrong_language", wrong_language, df[LANG] + " (p=" + df[LANG_CONFIDENCE].round(3).astype(str) + ")"),
        ("invalid_time", time_bad, "time is not an ISO-8601 timestamp"),
        ("duplicate_pair", key.duplicated(keep="first"), "same image and caption as an earlier row"),
    ]
    res = tables.partition(df, checks)
    stats = {**fix_counts, "n_text_changed": int((df[TEXT] != df[TEXT_RAW]).sum())}
    if cfg.keep_uncaptioned:
        stats["n_uncaptioned_kept"] = int(res.kept[TEXT].eq("").sum())
    return StageResult(res.kept, res.quarantined, stats)
