"""A deterministic, learnable synthetic image-text dataset with planted defects.

Scenes of one or two shapes (kind, colour, size, position) on a background, captioned from
several templates ("a small red circle on the left of a blue square"). Each scene is rendered one
to three times with jitter (near-duplicates sharing ``scene_id``), some images carry two
captions, and two rendering styles make two domains. About 10% of rows carry planted defects
that a later stage must catch; ``planted.csv`` says which row, which stage and which reason.
Near-duplicates pHash cannot see (a scene mirrored, cropped or overlaid, as an unrelated row) and a
small reference "benchmark" set beside the dataset (``benchmark/``, its own manifest) with exact,
resized, re-encoded, mirrored and cropped copies of its images (and one of its captions) in the pool
are planted too (``source`` names what each copies), for the decontam stage.
Optionally (off by default, so the default bytes never change) a share of rows gets the caption of
another scene (the noise that alignment filtering removes) or a caption in French, German or Spanish
(what a language filter removes); the default config keeps both, as planted.csv records. A share of
rows can also lose their caption (``uncaptioned``: empty text, the removed caption in planted.csv's
``expected_text``), work for the pseudo-label stage (with ``clean.keep_uncaptioned``; otherwise clean
quarantines them as ``empty_caption``).
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFilter

from mmcore import tables
from mmcore.errors import InputError

MIN_ROWS = 120
# Bumped whenever generate() writes other data for the same arguments (2: planted mirrored, cropped
# and overlaid copies and the reference benchmark set), so `mmpipe demo` regenerates older data.
VERSION = 2

SHAPES = ("circle", "square", "triangle", "diamond", "star")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 215, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
BACKGROUNDS = {"gray": (128, 128, 128), "beige": (215, 200, 170), "slate": (70, 85, 105)}
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "centre")
DOMAINS = ("flat", "textured")
PAIR_RELATIONS = ("left of", "right of", "above", "below")

SINGLE_TEMPLATES = (
    "a {size} {color} {shape} on the {pos}",
    "a {size} {color} {shape} at the {pos} of the picture",
    "{pos} side: a {color} {shape}, {size}, on a {bg} background",
    "a photo of a {size} {color} {shape} on the {pos} over a {bg} background",
)
PAIR_TEMPLATES = (
    "a {size} {color} {shape} {rel} a {color2} {shape2}",
    "a {color} {shape} {rel} a {size2} {color2} {shape2} on a {bg} background",
    "two shapes: a {size} {color} {shape} {rel} a {color2} {shape2}",
)
NON_LATIN = (
    "一个红色的圆形在图片的左边",
    "красный круг слева на сером фоне",
    "دائرة حمراء على اليسار",
    "ένας κόκκινος κύκλος στα αριστερά",
)

# Captions in other languages, from the same scenes: (templates, shape -> (noun, gender), colour ->
# (masculine, feminine), size -> (masculine, feminine), position, background). Real sentences, so that
# a language identifier recognises them.
FOREIGN = {
    "fr": (
        ("{art} {size} {shape} {color} {pos}", "une photo d'{art} {size} {shape} {color} {pos}, sur un fond {bg}"),
        {"circle": ("cercle", "m"), "square": ("carré", "m"), "triangle": ("triangle", "m"),
         "diamond": ("losange", "m"), "star": ("étoile", "f")},
        {"red": ("rouge", "rouge"), "green": ("vert", "verte"), "blue": ("bleu", "bleue"), "yellow": ("jaune", "jaune"),
         "purple": ("violet", "violette"), "orange": ("orange", "orange"), "white": ("blanc", "blanche"),
         "black": ("noir", "noire")},
        {"small": ("petit", "petite"), "large": ("grand", "grande")},
        {"left": "à gauche", "right": "à droite", "top": "en haut", "bottom": "en bas", "centre": "au centre"},
        {"gray": "gris", "beige": "beige", "slate": "ardoise"},
        {"m": "un", "f": "une"},
    ),
    "de": (
        ("{art} {size} {color} {shape} {pos}", "ein Foto: {art} {size} {color} {shape} {pos} auf {bg} Hintergrund"),
        {"circle": ("Kreis", "m"), "square": ("Quadrat", "n"), "triangle": ("Dreieck", "n"),
         "diamond": ("Raute", "f"), "star": ("Stern", "m")},
        {"red": ("roter", "rotes", "rote"), "green": ("grüner", "grünes", "grüne"), "blue": ("blauer", "blaues", "blaue"),
         "yellow": ("gelber", "gelbes", "gelbe"), "purple": ("violetter", "violettes", "violette"),
         "orange": ("orangefarbener", "orangefarbenes", "orangefarbene"), "white": ("weißer", "weißes", "weiße"),
         "black": ("schwarzer", "schwarzes", "schwarze")},
        {"small": ("kleiner", "kleines", "kleine"), "large": ("großer", "großes", "große")},
        {"left": "links", "right": "rechts", "top": "oben", "bottom": "unten", "centre": "in der Mitte"},
        {"gray": "grauem", "beige": "beigem", "slate": "schiefergrauem"},
        {"m": "ein", "n": "ein", "f": "eine"},
    ),
    "es": (
        ("{art} {shape} {color} {size} {pos}", "una foto de {art} {shape} {color} {size} {pos} sobre un fondo {bg}"),
        {"circle": ("círculo", "m"), "square": ("cuadrado", "m"), "triangle": ("triángulo", "m"),
         "diamond": ("rombo", "m"), "star": ("estrella", "f")},
        {"red": ("rojo", "roja"), "green": ("verde", "verde"), "blue": ("azul", "azul"),
         "yellow": ("amarillo", "amarilla"), "purple": ("morado", "morada"), "orange": ("naranja", "naranja"),
         "white": ("blanco", "blanca"), "black": ("negro", "negra")},
        {"small": ("pequeño", "pequeña"), "large": ("grande", "grande")},
        {"left": "a la izquierda", "right": "a la derecha", "top": "arriba", "bottom": "abajo", "centre": "en el centro"},
        {"gray": "gris", "beige": "beige", "slate": "pizarra"},
        {"m": "un", "f": "una"},
    ),
}
_GENDERS = {"fr": "mf", "de": "mnf", "es": "mf"}


def foreign_caption(scene: Scene, lang: str, rng: np.random.Generator) -> str:
    """A caption of the scene's main shape in ``lang`` (``FOREIGN``), with the right genders."""
    templates, shapes, colors, sizes, positions, backgrounds, articles = FOREIGN[lang]
    noun, gender = shapes[scene.shape]
    g = _GENDERS[lang].index(gender)
    return templates[rng.integers(len(templates))].format(
        art=articles[gender], size=sizes[scene.size][g], shape=noun, color=colors[scene.color][g],
        pos=positions[scene.pos], bg=backgrounds[scene.bg],
    )


# Planted defects: (name, share of rows, stage that must catch it, reason it must give). A stage
# of "" means the row must be kept (the defect is repaired or is a healthy odd encoding).
DEFECTS = (
    ("empty_caption", 0.006, "clean", "empty_caption"),
    ("whitespace_caption", 0.004, "clean", "empty_caption"),
    ("long_caption", 0.004, "clean", "caption_too_long"),
    ("repetitive_caption", 0.004, "clean", "repetitive_caption"),
    ("mojibake", 0.005, "", ""),
    ("html_entities", 0.005, "", ""),
    ("non_latin", 0.004, "", ""),
    ("missing_file", 0.004, "probe", "missing_file"),
    ("zero_byte", 0.004, "probe", "empty_file"),
    ("not_an_image", 0.004, "probe", "not_an_image"),
    ("truncated", 0.005, "probe", "corrupt_image"),
    ("tiny", 0.005, "quality", "too_small"),
    ("extreme_aspect", 0.005, "quality", "extreme_aspect"),
    ("too_dark", 0.006, "quality", "too_dark"),
    ("too_bright", 0.006, "quality", "too_bright"),
    ("blurry", 0.006, "quality", "blurry"),
    ("duplicate_image", 0.006, "quality", "duplicate_image"),
    ("duplicate_pair", 0.004, "clean", "duplicate_pair"),
)
# One of each, whatever n: the unsafe paths, a decompression bomb and healthy odd encodings.
SINGLETONS = (
    ("path_traversal", "probe", "outside_root"),
    ("absolute_path", "probe", "outside_root"),
    ("symlink_escape", "probe", "outside_root"),
    ("bomb", "probe", "too_many_pixels"),
    ("cmyk_jpeg", "", ""),
    ("grayscale", "", ""),
    ("palette_transparency", "", ""),
    ("rgba_png", "", ""),
    ("png16", "", ""),
    ("animated_gif", "", ""),
    ("uppercase_ext", "", ""),
    ("unicode_name", "", ""),
)
# Copies planted after the defects (a generator of their own): near-duplicates pHash cannot see, each a
# new row of an unrelated "upload" (its own scene_id), which decontam must link to its source so that
# split keeps the two on one side (stage "": kept); and copies of the reference benchmark set
# (``OUT/benchmark/``) inside the pool, which decontam must quarantine as eval_contamination.
POOL_COPIES = ("mirror_copy", "crop_copy", "overlay_copy")
BENCH_COPIES = ("bench_exact", "bench_resized", "bench_reencoded", "bench_mirrored", "bench_cropped", "bench_caption")
BENCH_DIR = "benchmark"  # OUT/benchmark/manifest.csv and OUT/benchmark/images/: the reference set
ASPECTS = ((4, 3), (3, 4), (1, 1), (16, 9), (3, 2), (2, 3))
FORMATS = (("jpg", 0.6), ("png", 0.25), ("webp", 0.15))


@dataclass(frozen=True)
class Scene:
    shape: str
    color: str
    size: str
    pos: str
    bg: str
    domain: str
    shape2: str | None
    color2: str | None
    size2: str | None
    rel: str | None


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float, fill) -> None:
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif kind == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif kind == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    elif kind == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    else:  # star
        pts = []
        for k in range(10):
            a = -np.pi / 2 + k * np.pi / 5
            rr = r if k % 2 == 0 else r * 0.45
            pts.append((cx + rr * np.cos(a), cy + rr * np.sin(a)))
        draw.polygon(pts, fill=fill)


_ANCHORS = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75), "centre": (0.5, 0.5)}
_REL_ANCHORS = {
    "left of": ((0.28, 0.5), (0.72, 0.5)),
    "right of": ((0.72, 0.5), (0.28, 0.5)),
    "above": ((0.5, 0.27), (0.5, 0.73)),
    "below": ((0.5, 0.73), (0.5, 0.27)),
}


def render(scene: Scene, w: int, h: int, rng: np.random.Generator) -> Image.Image:
    """Draw a scene at w x h with a little jitter (so renders of one scene are near-duplicates)."""
    bg = np.array(BACKGROUNDS[scene.bg], dtype=np.float32)
    if scene.domain == "textured":
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        grad = 30 * np.sin(xx / (w / 3.0) + rng.uniform(0, 6)) * np.cos(yy / (h / 2.0))
        noise = rng.normal(0, 18, size=(h, w, 1)).astype(np.float32)
        arr = np.clip(bg[None, None, :] + grad[..., None] + noise, 0, 255).astype(np.uint8)
        img = Image.fromarray(arr, "RGB")
    else:
        img = Image.new("RGB", (w, h), tuple(int(v) for v in bg))
    draw = ImageDraw.Draw(img)
    short = min(w, h)
    jit = lambda: rng.uniform(-0.03, 0.03)  # noqa: E731
    radius = {"small": 0.11, "large": 0.2}
    if scene.shape2 is None:
        ax, ay = _ANCHORS[scene.pos]
        r = short * radius[scene.size] * rng.uniform(0.92, 1.08)
        _draw_shape(draw, scene.shape, (ax + jit()) * w, (ay + jit()) * h, r, COLORS[scene.color])
    else:
        (ax, ay), (bx, by) = _REL_ANCHORS[scene.rel]
        r1 = short * radius[scene.size] * rng.uniform(0.92, 1.08)
        r2 = short * radius[scene.size2] * rng.uniform(0.92, 1.08)
        _draw_shape(draw, scene.shape, (ax + jit()) * w, (ay + jit()) * h, r1, COLORS[scene.color])
        _draw_shape(draw, scene.shape2, (bx + jit()) * w, (by + jit()) * h, r2, COLORS[scene.color2])
    return img


def caption(scene: Scene, rng: np.random.Generator) -> str:
    if scene.shape2 is None:
        t = SINGLE_TEMPLATES[rng.integers(len(SINGLE_TEMPLATES))]
    else:
        t = PAIR_TEMPLATES[rng.integers(len(PAIR_TEMPLATES))]
    return t.format(
        size=scene.size, color=scene.color, shape=scene.shape, pos=scene.pos, bg=scene.bg,
        shape2=scene.shape2, color2=scene.color2, size2=scene.size2, rel=scene.rel,
    )


def _random_scene(rng: np.random.Generator) -> Scene:
    def pick(xs):
        return xs[rng.integers(len(xs))]

    color = pick(tuple(COLORS))
    pair = rng.random() < 0.35
    color2 = pick(tuple(c for c in COLORS if c != color)) if pair else None
    return Scene(
        shape=pick(SHAPES), color=color, size=pick(SIZES), pos=pick(POSITIONS), bg=pick(tuple(BACKGROUNDS)),
        domain=DOMAINS[int(rng.random() < 0.4)], shape2=pick(SHAPES) if pair else None, color2=color2,
        size2=pick(SIZES) if pair else None, rel=pick(PAIR_RELATIONS) if pair else None,
    )


def _size(rng: np.random.Generator) -> tuple[int, int]:
    aw, ah = ASPECTS[rng.integers(len(ASPECTS))]
    short = int(rng.integers(160, 321))
    return (short * aw // ah, short) if aw >= ah else (short, short * ah // aw)


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpg":
        img.save(buf, "JPEG", quality=90)
    elif fmt == "png":
        img.save(buf, "PNG", compress_level=1)
    else:
        img.save(buf, "WEBP", quality=85, method=0)
    return buf.getvalue()


def bomb_png(width: int = 40000, height: int = 40000) -> bytes:
    """A small PNG whose header claims width x height pixels (a decompression bomb's header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _odd_encoding(kind: str, img: Image.Image) -> tuple[bytes, str]:
    buf = io.BytesIO()
    if kind == "cmyk_jpeg":
        img.convert("CMYK").save(buf, "JPEG", quality=90)
        return buf.getvalue(), "jpg"
    if kind == "grayscale":
        img.convert("L").save(buf, "PNG")
        return buf.getvalue(), "png"
    if kind == "palette_transparency":
        p = img.convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
        p.save(buf, "PNG", transparency=0)
        return buf.getvalue(), "png"
    if kind == "rgba_png":
        rgba = img.convert("RGBA")
        rgba.putalpha(200)
        rgba.save(buf, "PNG")
        return buf.getvalue(), "png"
    if kind == "png16":
        arr = (np.asarray(img.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
        Image.fromarray(arr).save(buf, "PNG")
        return buf.getvalue(), "png"
    if kind == "animated_gif":
        frames = [img.convert("P"), img.transpose(Image.Transpose.FLIP_TOP_BOTTOM).convert("P")]
        frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
        return buf.getvalue(), "gif"
    if kind == "uppercase_ext":
        img.save(buf, "JPEG", quality=90)
        return buf.getvalue(), "JPG"
    img.save(buf, "JPEG", quality=90)  # unicode_name
    return buf.getvalue(), "jpg"


def _mojibake(text: str) -> tuple[str, str]:
    clean = f"{text} — très joli"
    return clean.encode("utf-8").decode("cp1252", errors="replace"), clean


def generate(
    out: str | os.PathLike, n: int = 3000, seed: int = 0, mismatch_rate: float = 0.0, foreign_rate: float = 0.0,
    uncaptioned_rate: float = 0.0,
) -> pd.DataFrame:
    """Write ``OUT/images/*``, ``OUT/manifest.csv`` and ``OUT/planted.csv``; returns the manifest.

    ``n`` is the number of manifest rows (pairs). The same arguments give the same bytes; the rates
    change only the captions they plant. Also writes ``OUT/benchmark/`` (a reference set, its own
    manifest) and plants copies of it, and mirrored, cropped and overlaid copies of pool scenes.

    Args:
        mismatch_rate: share of rows (among those without another planted defect) whose caption is
            replaced by a caption of another scene (defect ``mismatch``).
        foreign_rate: share of rows whose caption is replaced by one of the same scene in French,
            German or Spanish (defect ``foreign_language``).
        uncaptioned_rate: share of rows (among those without another planted defect) whose caption is
            emptied (defect ``uncaptioned``; ``expected_text`` is the caption removed).
    """
    if n < MIN_ROWS:
        raise InputError(f"synth: --n must be >= {MIN_ROWS} to plant every kind of defect, got {n}")
    for name, rate in (("mismatch_rate", mismatch_rate), ("foreign_rate", foreign_rate),
                       ("uncaptioned_rate", uncaptioned_rate)):
        if not 0 <= rate <= 0.5:
            raise InputError(f"synth: {name} must be in [0, 0.5], got {rate}")
    out = Path(out)
    img_dir = out / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    t0 = datetime(2025, 1, 1, tzinfo=timezone.utc)

    rows: list[dict] = []
    planted: list[dict] = []
    files: dict[str, bytes] = {}
    scene_id = 0
    while len(rows) < n:
        scene = _random_scene(rng)
        when = t0 + timedelta(seconds=int(rng.integers(0, 365 * 86400)))
        for k in range(int(rng.integers(1, 4))):
            w, h = _size(rng)
            img = render(scene, w, h, rng)
            fmt = FORMATS[int(np.searchsorted(np.cumsum([p for _, p in FORMATS]), rng.random()))][0]
            name = f"images/{len(files):05d}.{fmt}"
            files[name] = _encode(img, fmt)
            texts = [caption(scene, rng)]
            if rng.random() < 0.15:  # some images have two (different) captions
                texts += [t for t in (caption(scene, rng) for _ in range(4)) if t != texts[0]][:1]
            for text in texts:
                rows.append({
                    "image_path": name, "text": text, "scene_id": f"s{scene_id:05d}",
                    "timestamp": (when + timedelta(minutes=7 * k)).isoformat(),
                    "label": scene.shape, "domain": scene.domain, "_scene": scene,
                })
        scene_id += 1
    rows = rows[:n]

    # Plant defects on distinct random rows, each on a single-caption image so that the defect
    # belongs to exactly one row.
    path_uses = pd.Series([r["image_path"] for r in rows]).value_counts()
    candidates = [i for i, r in enumerate(rows) if path_uses[r["image_path"]] == 1]
    order = rng.permutation(candidates)
    plan = [(d, st, rs) for d, share, st, rs in DEFECTS for _ in range(max(1, round(n * share)))]
    plan += list(SINGLETONS)
    if 2 * len(plan) > len(order):
        raise InputError(f"synth: n={n} is too small for {len(plan)} planted defects; use a larger --n")
    # A real file outside the dataset root: only the root check can stop it being read.
    outside = Path("/etc/hostname")
    spare = {int(k) for k in order[len(plan) :]}  # healthy rows that duplicates may copy
    used: set[int] = set()
    for (defect, stage, reason), i in zip(plan, order[: len(plan)]):
        i = int(i)
        r = rows[i]
        scene: Scene = r["_scene"]
        path = r["image_path"]
        expected = ""
        if defect in ("empty_caption",):
            r["text"] = ""
        elif defect == "whitespace_caption":
            r["text"] = "   \t  "
        elif defect == "long_caption":
            r["text"] = " ".join(caption(scene, rng) for _ in range(80))
        elif defect == "repetitive_caption":
            r["text"] = " ".join([scene.color] * 12)
        elif defect == "mojibake":
            r["text"], expected = _mojibake(r["text"])
        elif defect == "html_entities":
            expected = r["text"] + " & more — see <this>"
            r["text"] = r["text"] + " &amp; more &mdash; see &lt;this&gt;"
        elif defect == "non_latin":
            r["text"] = expected = NON_LATIN[i % len(NON_LATIN)]
        elif defect == "missing_file":
            del files[path]
        elif defect == "zero_byte":
            files[path] = b""
        elif defect == "not_an_image":
            files[path] = rng.bytes(2048)
        elif defect == "truncated":
            data = _encode(render(scene, 320, 240, rng), "jpg")
            new = path.rsplit(".", 1)[0] + ".jpg"
            del files[path]
            files[new] = data[: len(data) // 2]
            r["image_path"] = new
        elif defect == "tiny":
            files[path] = _encode(render(scene, 24, 20, rng), path.rsplit(".", 1)[1])
        elif defect == "extreme_aspect":
            files[path] = _encode(render(scene, 1200, 110, rng), path.rsplit(".", 1)[1])
        elif defect in ("too_dark", "too_bright"):
            img = render(scene, 320, 240, rng)
            arr = np.asarray(img, dtype=np.float32)
            arr = arr * 0.06 if defect == "too_dark" else 235 + arr * 0.07
            files[path] = _encode(Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)), path.rsplit(".", 1)[1])
        elif defect == "blurry":
            img = render(scene, 320, 240, rng).filter(ImageFilter.GaussianBlur(12))
            files[path] = _encode(img, path.rsplit(".", 1)[1])
        elif defect == "duplicate_image":
            # Another image's exact bytes under a new name: pixels equal to an earlier file.
            # Sources are healthy rows that carry no defect (beyond the planted ones in order).
            # The copy must come after its source, so that the copy is what quality drops.
            j = min(spare - used)
            if j >= i:
                continue
            used.add(j)
            first = rows[j]["image_path"]
            del files[path]
            new = path.rsplit(".", 1)[0] + "_copy." + first.rsplit(".", 1)[1]
            files[new] = files[first]
            r["image_path"] = new
        elif defect == "duplicate_pair":
            # The same image and caption as an earlier healthy row, which stays (it comes first).
            j = min(spare - used)
            if j >= i:
                continue
            used.add(j)
            del files[path]
            r["image_path"], r["text"] = rows[j]["image_path"], rows[j]["text"]
        elif defect == "path_traversal":
            del files[path]
            r["image_path"] = "../" * 12 + str(outside).lstrip("/")
        elif defect == "absolute_path":
            del files[path]
            r["image_path"] = str(outside)
        elif defect == "symlink_escape":
            del files[path]
            r["image_path"] = path.rsplit(".", 1)[0] + "_link.jpg"
        elif defect == "bomb":
            del files[path]
            r["image_path"] = path.rsplit(".", 1)[0] + "_bomb.png"
            files[r["image_path"]] = bomb_png()
        else:  # healthy odd encodings
            img = render(scene, 300, 200, rng)
            data, ext = _odd_encoding(defect, img)
            del files[path]
            stem = path.rsplit(".", 1)[0]
            r["image_path"] = (stem.replace("images/", "images/ünï_çødé_") if defect == "unicode_name" else stem) + "." + ext
            files[r["image_path"]] = data
        planted.append({"row_id": i, "defect": defect, "stage": stage, "reason": reason, "expected_text": expected})

    planted += _plant_copies(rows, files, planted, used, out, n, seed)
    planted += _plant_captions(rows, planted, mismatch_rate, foreign_rate, seed)
    planted += _plant_uncaptioned(rows, planted, uncaptioned_rate, seed)

    for name, data in sorted(files.items()):
        (out / name).write_bytes(data)
    for p in planted:
        if p["defect"] == "symlink_escape":
            link = out / rows[p["row_id"]]["image_path"]
            link.unlink(missing_ok=True)
            os.symlink(outside, link)

    manifest = pd.DataFrame([{k: v for k, v in r.items() if k != "_scene"} for r in rows])
    manifest.to_csv(out / "manifest.csv", index=False)
    cols = ["row_id", "defect", "stage", "reason", "expected_text", "source"]
    pd.DataFrame(planted, columns=cols).fillna({"source": ""}).sort_values(tables.ROW_ID).to_csv(out / "planted.csv", index=False)
    return manifest


def _decode(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB")


def _mirror_scene(scene: Scene) -> Scene:
    """The scene as its mirror image shows it: left and right swapped."""
    swap = {"left": "right", "right": "left", "left of": "right of", "right of": "left of"}
    return Scene(**{**scene.__dict__, "pos": swap.get(scene.pos, scene.pos), "rel": swap.get(scene.rel, scene.rel)})


def _crop(img: Image.Image, margin: float, resize_back: bool) -> Image.Image:
    w, h = img.size
    dx, dy = round(w * margin), round(h * margin)
    out = img.crop((dx, dy, w - dx, h - dy))
    return out.resize((w, h), Image.Resampling.BILINEAR) if resize_back else out


def _overlay(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A watermark: a light bar along the bottom with dark blocks of "text" in it."""
    out = img.copy()
    draw = ImageDraw.Draw(out)
    w, h = out.size
    top = int(h * 0.82)
    draw.rectangle([0, top, w, h], fill=(235, 235, 235))
    x = int(w * 0.05)
    while x < w * 0.9:
        bw = int(rng.integers(w // 30, w // 12))
        draw.rectangle([x, top + (h - top) // 3, x + bw, h - (h - top) // 3], fill=(30, 30, 30))
        x += bw + int(rng.integers(3, 9))
    return out


def bench_scene(i: int, rng: np.random.Generator) -> tuple[Image.Image, str, str]:
    """A reference benchmark image (four shapes anywhere on a shaded background, unlike the pool's
    five anchors), its caption and label."""
    w, h = _size(rng)
    bg = tuple(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    shade = 40 * np.sin(xx / (w / rng.uniform(1.5, 4)) + rng.uniform(0, 6)) * np.cos(yy / (h / rng.uniform(1, 3)) + rng.uniform(0, 6))
    arr = np.clip(np.array(BACKGROUNDS[bg], np.float32)[None, None] + shade[..., None], 0, 255).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    draw = ImageDraw.Draw(img)
    names = []
    for _ in range(4):
        shape, color = SHAPES[rng.integers(len(SHAPES))], tuple(COLORS)[rng.integers(len(COLORS))]
        r = min(w, h) * rng.uniform(0.08, 0.2)
        _draw_shape(draw, shape, rng.uniform(0.15, 0.85) * w, rng.uniform(0.15, 0.85) * h, r, COLORS[color])
        names.append((color, shape))
    (c1, s1), (c2, s2), (c3, s3), (c4, s4) = names
    return img, f"benchmark scene {i}: a {c1} {s1}, a {c2} {s2}, a {c3} {s3} and a {c4} {s4} on a {bg} background", s1


def _plant_copies(rows: list[dict], files: dict[str, bytes], planted: list[dict], used: set[int], out: Path,
                  n: int, seed: int) -> list[dict]:
    """Mirrored, cropped and overlaid copies of pool scenes as unrelated rows, and the reference
    benchmark set (``OUT/benchmark/``) with exact, resized, re-encoded, mirrored and cropped copies of
    its images (and one of its captions) planted in the pool. Each replaces a healthy single-caption
    row's image and caption; a generator of its own, so every other row stays as it was."""
    rng = np.random.default_rng([seed, 29])
    taken = {p["row_id"] for p in planted} | used
    uses = pd.Series([r["image_path"] for r in rows]).value_counts()
    sources = set(used)  # rows other plants copied from: their files must stay as they are
    for p in planted:
        if p["defect"] in ("duplicate_image", "duplicate_pair"):
            sources.add(p["row_id"])
    free = [i for i in rng.permutation(len(rows)).tolist()
            if i not in taken and i not in sources and uses[rows[i]["image_path"]] == 1 and rows[i]["image_path"] in files]
    out_rows: list[dict] = []

    def take(pred=lambda i: True) -> int | None:
        for k, i in enumerate(free):
            if pred(i):
                return free.pop(k)
        return None

    def replace(i: int, img: Image.Image | None, text: str, scene_id: str, ext: str | None = None,
                data: bytes | None = None) -> None:
        r = rows[i]
        stem, old_ext = r["image_path"].rsplit(".", 1)
        ext = ext or old_ext
        del files[r["image_path"]]
        r["image_path"] = f"{stem}.{ext}"
        files[r["image_path"]] = data if data is not None else _encode(img, ext)
        r["text"], r["scene_id"] = text, scene_id

    # 1. Near-duplicates of pool scenes: a mirrored copy (asymmetric scenes: left/right matters), a
    # crop and an overlay, each under a scene id of its own.
    k_pool = max(2, round(n * 0.004))
    for kind in POOL_COPIES:
        for k in range(k_pool):
            asym = (lambda i: rows[i]["_scene"].pos in ("left", "right") or rows[i]["_scene"].rel in ("left of", "right of"))
            src = take(asym if kind == "mirror_copy" else (lambda i: True))
            dst = take()
            if src is None or dst is None:
                break
            scene: Scene = rows[src]["_scene"]
            img = _decode(files[rows[src]["image_path"]])
            if kind == "mirror_copy":
                img, text = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT), caption(_mirror_scene(scene), rng)
            elif kind == "crop_copy":
                img, text = _crop(img, 0.15, True), caption(scene, rng)
            else:
                img, text = _overlay(img, rng), caption(scene, rng)
            replace(dst, img, text, f"{kind.split('_')[0]}{k:04d}")
            rows[dst].update(label=rows[src]["label"], domain=rows[src]["domain"])
            out_rows.append({"row_id": dst, "defect": kind, "stage": "", "reason": "", "expected_text": "",
                             "source": f"pool:{src}"})

    # 2. The reference benchmark: its own images and manifest beside the dataset. A benchmark is not
    # a near-duplicate of the web data except where copied: an image whose pHash (or its mirror's or
    # a crop's) is within 8 bits of any pool image is drawn again (flat renders of this small world
    # of shapes often are), so every pool row decontam matches is a planted copy.
    from mmcore.decontam import hex_hashes, image_hashes, informative

    _, pool = hex_hashes(pd.Series([f"{h:016x}" for data in files.values() for h in _hashes_or_none(data)]))
    bench = out / BENCH_DIR
    (bench / "images").mkdir(parents=True, exist_ok=True)
    n_bench = max(20, n // 50)
    bench_rows, bench_files = [], {}
    for b in range(n_bench):
        while True:
            img, text, label = bench_scene(b, rng)
            h, m, crops = image_hashes(_encode(img, "png"), (0.025, 0.05, 0.075))
            mine = np.array([h, m, *crops], np.uint64)
            if informative(mine).all() and (not pool.size or np.bitwise_count(mine[:, None] ^ pool[None]).min() > 8):
                break
        fmt = ("jpg", "png")[b % 2]
        name = f"images/b{b:05d}.{fmt}"
        bench_files[name] = _encode(img, fmt)
        bench_rows.append({"image_path": name, "text": text, "label": label})
    for name, data in bench_files.items():
        (bench / name).write_bytes(data)
    pd.DataFrame(bench_rows).to_csv(bench / "manifest.csv", index=False)

    # 3. Its copies in the pool, each of a benchmark image of its own.
    k_bench = max(2, round(n * 0.002))
    b = 0
    for kind in BENCH_COPIES:
        for _ in range(k_bench):
            dst = take()
            if dst is None or b >= n_bench:
                break
            src = bench_rows[b]
            data = bench_files[src["image_path"]]
            img, ext = _decode(data), None
            text = f"a picture of three shapes on the {rows[dst]['_scene'].bg} background"
            raw = None
            if kind == "bench_exact":
                raw, ext = data, src["image_path"].rsplit(".", 1)[1]
            elif kind == "bench_resized":
                img = img.resize((max(96, round(img.width * 0.6)), max(96, round(img.height * 0.6))), Image.Resampling.BILINEAR)
            elif kind == "bench_reencoded":
                buf = io.BytesIO()
                img.save(buf, "JPEG", quality=35)
                raw, ext = buf.getvalue(), "jpg"
            elif kind == "bench_mirrored":
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            elif kind == "bench_cropped":
                img = _crop(img, float(rng.uniform(0.02, 0.06)), False)
            if kind == "bench_caption":  # the image stays; the caption is the benchmark's
                rows[dst]["text"] = src["text"]
            else:
                replace(dst, img, text, f"web{b:04d}", ext=ext, data=raw)
                rows[dst]["label"] = src["label"]
            out_rows.append({"row_id": dst, "defect": kind, "stage": "decontam", "reason": "eval_contamination",
                             "expected_text": "", "source": f"{BENCH_DIR}:{b}"})
            b += 1
    return out_rows


def _hashes_or_none(data: bytes) -> list[int]:
    """pHash and mirrored pHash of an image's bytes; none for a file that does not decode."""
    from mmcore.decontam import image_hashes

    try:
        h, m, _ = image_hashes(data)
    except Exception:  # planted broken files
        return []
    return [h, m]


def _plant_captions(rows: list[dict], planted: list[dict], mismatch_rate: float, foreign_rate: float,
                    seed: int) -> list[dict]:
    """Replace captions of rows without another defect: another scene's (mismatch) or a foreign one.

    A generator of its own, so that the main stream (and with rates of 0, every byte) is unchanged.
    """
    if not mismatch_rate and not foreign_rate:
        return []
    rng = np.random.default_rng([seed, 19])
    taken = {p["row_id"] for p in planted}
    free = rng.permutation([i for i in range(len(rows)) if i not in taken])
    n_mis, n_for = round(len(rows) * mismatch_rate), round(len(rows) * foreign_rate)
    if n_mis + n_for > len(free):
        raise InputError(f"synth: mismatch_rate + foreign_rate leave too few healthy rows ({len(free)})")
    out = []
    for k, i in enumerate(free[: n_mis + n_for].tolist()):
        r = rows[i]
        if k < n_mis:
            j = int(rng.integers(len(rows)))
            while rows[j]["scene_id"] == r["scene_id"]:
                j = int(rng.integers(len(rows)))
            r["text"], defect = caption(rows[j]["_scene"], rng), "mismatch"
        else:
            lang = ("fr", "de", "es")[(k - n_mis) % 3]
            r["text"], defect = foreign_caption(r["_scene"], lang, rng), f"foreign_language_{lang}"
        out.append({"row_id": i, "defect": defect, "stage": "", "reason": "", "expected_text": r["text"]})
    return out


def _plant_uncaptioned(rows: list[dict], planted: list[dict], rate: float, seed: int) -> list[dict]:
    """Empty the captions of a share of rows without another defect (a generator of its own: with a
    rate of 0 every byte is as before). Only images with a single caption, so the image has none left."""
    if not rate:
        return []
    rng = np.random.default_rng([seed, 23])
    taken = {p["row_id"] for p in planted}
    uses = pd.Series([r["image_path"] for r in rows]).value_counts()
    free = rng.permutation([i for i in range(len(rows)) if i not in taken and uses[rows[i]["image_path"]] == 1])
    k = round(len(rows) * rate)
    if k > len(free):
        raise InputError(f"synth: uncaptioned_rate leaves too few healthy rows ({len(free)})")
    out = []
    for i in sorted(free[:k].tolist()):
        removed, rows[i]["text"] = rows[i]["text"], ""
        out.append({"row_id": i, "defect": "uncaptioned", "stage": "clean", "reason": "empty_caption",
                    "expected_text": removed})
    return out


def planted(out: str | os.PathLike) -> pd.DataFrame:
    """The defects ``generate`` planted: row_id, defect, stage, reason, expected_text."""
    return pd.read_csv(Path(out) / "planted.csv", keep_default_na=False)
