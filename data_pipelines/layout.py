"""insightface's layout read from its own records: the identity records give every label.

insightface's files (MS1MV3, Glint360K, WebFace42M; ``pack --sorted`` and ``synth`` write the
same) hold record 0 = header, labels ``(A, M)``: images are keys ``1..A-1`` and identity
records ``A..M-1``, one per identity, whose labels are that identity's key range. With the
``.idx`` that is every image record's offset and label, so a cold start reads the ``.idx``, the
header and the identity records (2M of 44M records at WebFace42M scale, contiguous at the end
of the file), not the image records. Their headers are checked when training reads them
(``recordio.image_record``: framing, and the label against the identity's).

The ranges are validated before they are trusted: ascending, disjoint, without gaps, covering
exactly the image keys, the header agreeing with the ``.idx``, the ``.idx`` reaching the end of
the ``.rec``. A disagreement raises ``LayoutError``, one line naming the record. A file that does
not claim ranges (no header record; identity records holding ``(identity, count)`` as ``pack``'s
shuffled files do; an unreadable header or identity record) is not this layout:
``build_layout`` returns None and the caller scans every record, which names each bad one.

IRHeader labels are float32, exact for keys below 2^24 only; Glint360K and WebFace42M have more
keys. A range bound above 2^24 is rounded (to an even key, a multiple of 4, ...), so the true
boundary lies among the few keys that round to the stored float: those records' headers are
read (1-4 per identity boundary past key 2^24) and their own labels decide.
"""

from __future__ import annotations

import logging
import mmap

import numpy as np

from . import recordio
from .scan import property_classes, require_files
from .table import INSIGHTFACE, TableWriter, meta_of

log = logging.getLogger(__name__)
EXACT = 2.0**24  # float32 holds every integer below this exactly
_CHUNK = 1 << 16
_READ_AROUND = 1 << 17  # bytes the kernel reads around a page fault by default (ra_pages)


class LayoutError(ValueError):
    """The header, identity records and ``.idx`` disagree; the message names the record."""


def build_layout(prefix: str, out: TableWriter) -> dict | None:
    """Write the image records' keys, offsets and labels to ``out`` from the identity records.

    Returns the table's metadata, or None when the file does not have this layout (``out``
    may then hold a partial write the caller discards). Raises ``LayoutError``.
    """
    rec, idx = require_files(prefix)
    first = recordio.first_index_line(idx)
    if first is None or first[0] != 0:
        return None
    with recordio.FileMap(rec) as rm:
        return _build(prefix, rec, idx, first[1], rm, out)


def _build(
    prefix: str, rec: str, idx: str, off0: int, rm: recordio.FileMap, out: TableWriter
) -> dict | None:
    head = _heads(rm, np.array([off0], np.int64))
    if not _identity_shaped(head, np.array([off0]), rm.size)[0]:
        return None  # record 0 is an image (or unreadable): no header, the im2rec layout
    a, b = float(head["label0"][0]), float(head["label1"][0])
    where0 = f"{rec}: header record key=0 offset={off0}"
    if not (_integral(a) and _integral(b) and 1 <= a <= b):
        raise LayoutError(f"{where0}: its labels ({a:g}, {b:g}) are not key bounds 1 <= A <= M")
    if not recordio.index_ends_cleanly(idx):
        raise LayoutError(
            f"{idx}: the last line has no newline: the .idx is cut short; rebuild it with "
            f"`python -m data_pipelines.index {rec} --force`"
        )
    lo_a = int(_bounds(np.array([a]))[0][0])  # the least key that rounds to a
    streamed = _stream_index(idx, lo_a, out)
    if streamed is None:
        return None
    m, tail_offs = streamed
    if np.float32(m) != np.float32(b):
        raise LayoutError(
            f"{where0}: says the file holds {b:.0f} records (images 1..{a - 1:.0f}, identity "
            f"records {a:.0f}..{b - 1:.0f}) but {idx} lists {m}: a truncated .idx, or one of "
            "another file"
        )
    first_id, read = _first_identity(rm, a, lo_a, m, tail_offs, where0)
    if first_id is None or first_id >= m:
        return None  # an unreadable record there (the scan names it), or no identity records
    out.append("keys", np.arange(lo_a, first_id))
    out.append("offsets", tail_offs[: first_id - lo_a])
    ident_offs = tail_offs[first_id - lo_a :]
    ranges = _identity_ranges(rm, ident_offs, first_id, where0)
    read += 1 + ident_offs.size
    if ranges is None or ranges[0][0] == 0.0:
        return None  # an unreadable identity record, or (identity, count) records: no ranges
    starts, ends = ranges
    if starts[0] != 1.0:
        raise LayoutError(
            f"{rec}: identity record key={first_id} offset={int(ident_offs[0])}: range "
            f"[{starts[0]:g}, {ends[0]:g}) of the first identity does not start at key 1, the "
            f"first image (the header record, key 0, puts identity records at {first_id}..{m - 1})"
        )
    _check_ranges(rec, starts, ends, first_id, ident_offs)
    end = _record_end(rm, int(ident_offs[-1]))
    if end != rm.size:
        raise LayoutError(
            f"{rec}: the last record {idx} lists (key {m - 1}, offset {int(ident_offs[-1])}) "
            f"ends at byte {end} but the file holds {rm.size} bytes: the .idx is truncated or "
            "belongs to another file"
        )
    settled = _write_labels(rec, rm, out, starts, first_id)
    if settled is None:
        return None  # an unreadable image record among the window records: the scan names it
    read += settled
    declared = property_classes(prefix) or int(starts.size)
    return meta_of([], (first_id, m), declared, m, INSIGHTFACE, records_read=read)


def _stream_index(idx: str, lo_a: int, out: TableWriter) -> tuple[int, np.ndarray] | None:
    """Stream the ``.idx``: image keys ``1..lo_a-1`` and their offsets into ``out`` chunk by
    chunk; returns ``(records listed, offsets of keys lo_a..)``, or ``None`` when keys or offsets
    are not in file order (then every record is scanned)."""
    tail = []  # offsets of keys lo_a..M-1: the last images and the identity records
    pos, last = 0, -1
    for keys, offs in recordio.iter_index(idx):
        n = keys.size
        if n == 0:
            continue
        if not np.array_equal(keys, np.arange(pos, pos + n)) or offs[0] <= last:
            log.info("%s: keys are not 0, 1, 2, ... in file order; scanning every record", idx)
            return None
        if bool((np.diff(offs) <= 0).any()):
            log.info("%s: offsets are not ascending; scanning every record", idx)
            return None
        lo, hi = max(1, pos), min(lo_a, pos + n)
        if hi > lo:
            out.append("keys", np.arange(lo, hi))
            out.append("offsets", offs[lo - pos : hi - pos])
        start = max(lo_a, pos)
        if pos + n > start:
            tail.append(offs[start - pos :])
        pos, last = pos + n, int(offs[-1])
    tail_offs = np.concatenate(tail) if tail else np.zeros(0, np.int64)
    return pos, tail_offs


def _write_labels(
    rec: str, rm: recordio.FileMap, out: TableWriter, starts: np.ndarray, first_id: int
) -> int | None:
    """Every image's label into ``out`` from the identity ranges, reading the records around
    each float32-rounded bound (``window_keys``) to settle them exactly; the records read, or
    ``None`` when one of those is unreadable."""
    wkeys = window_keys(starts, first_id)
    wlabels = _window_labels(rm, out.column("offsets"), wkeys)
    if wlabels is None:
        return None  # an unreadable image record among them: the scan names it
    lo_s, hi_s = _bounds(starts)
    bad = check_window_labels(wkeys, wlabels, lo_s, hi_s)
    if bad is not None:
        j, low, high = bad
        span = f"identity {low}" if low == high else f"identities {low}..{high}"
        raise LayoutError(
            f"{rec}: image record key={int(wkeys[j])} offset="
            f"{int(out.column('offsets')[wkeys[j] - 1])}: label {int(wlabels[j])}, but the "
            f"identity records' (float32-rounded) ranges put it in {span}"
        )
    previous = 0
    for k0 in range(1, first_id, _CHUNK):
        keys = np.arange(k0, min(first_id, k0 + _CHUNK))
        labels = assign_labels(keys, starts, wkeys, wlabels)
        falls = np.flatnonzero(np.diff(np.r_[previous, labels]) < 0)
        if falls.size:
            k = int(keys[falls[0]])
            raise LayoutError(
                f"{rec}: image record key={k} offset={int(out.column('offsets')[k - 1])}: label "
                f"{int(labels[falls[0]])} follows label {int(np.r_[previous, labels][falls[0]])}"
                ": the images are not grouped by identity as the identity records say"
            )
        previous = int(labels[-1])
        out.append("labels", labels)
    return int(wkeys.size)


def _heads(rm: recordio.FileMap, offsets: np.ndarray) -> np.ndarray:
    return recordio.gather_heads(rm.array, offsets)


def _payload(h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(payload length, image length) of gathered record heads."""
    length = (h["lrec"] & recordio.MAX_PART).astype(np.int64)
    return length, length - recordio.IR_SIZE - 4 * h["flag"].astype(np.int64)


def _framed(h: np.ndarray, offs: np.ndarray, size: int) -> np.ndarray:
    """One-part records inside the file whose IRHeader and label floats fit their payload."""
    length, image_len = _payload(h)
    return (
        (h["magic"] == recordio.MAGIC)
        & ((h["lrec"] >> 29) == 0)
        & (offs >= 0)
        & (offs + 8 + length <= size)
        & (image_len >= 0)
    )


def _identity_shaped(h: np.ndarray, offs: np.ndarray, size: int) -> np.ndarray:
    """Whole one-part records with two or more labels and no image: a header or identity."""
    return _framed(h, offs, size) & (h["flag"] >= 2) & (_payload(h)[1] == 0)


def _ends(h: np.ndarray, offs: np.ndarray) -> np.ndarray:
    """Offset of the record after each one (its part padded to 4 bytes)."""
    length, _ = _payload(h)
    return offs + 8 + length + (-length % 4)


def _record_end(rm: recordio.FileMap, offset: int) -> int:
    offs = np.array([offset], np.int64)
    return int(_ends(_heads(rm, offs), offs)[0])


def _first_identity(
    rm: recordio.FileMap, a: float, lo_a: int, m: int, tail_offs: np.ndarray, where0: str
) -> tuple[int | None, int]:
    """(first identity record's key, records read) from the header's float ``a``.

    Below 2^24 ``a`` is exact. Above, it is one of the keys that round to it; their records
    are read: images up to the first identity record, identity records after it.
    """
    if a < EXACT:
        return int(a), 0
    hi_a = int(_bounds(np.array([a]))[1][0])
    keys = np.arange(lo_a, min(hi_a, m - 1) + 1)
    if keys.size == 0:
        return None, 0
    offs = tail_offs[keys - lo_a]
    h = _heads(rm, offs)
    ident = _identity_shaped(h, offs, rm.size)
    image = _framed(h, offs, rm.size) & (_payload(h)[1] > 0)
    if not (ident | image).all():
        return None, keys.size
    first = int(keys[np.argmax(ident)]) if ident.any() else int(keys[-1]) + 1
    if (ident[keys < first]).any() or not ident[keys >= first].all():
        k = int(keys[np.flatnonzero(image & (keys >= first))[0]])
        raise LayoutError(
            f"{where0}: image record key={k} lies among the identity records (from key {first})"
        )
    if np.float32(first) != np.float32(a):
        raise LayoutError(
            f"{where0}: says identity records start at key {a:.0f}, but keys {lo_a}..{hi_a} "
            "(all that round to it in float32) hold image records"
        )
    return first, keys.size


def _identity_ranges(
    rm: recordio.FileMap, offs: np.ndarray, first_id: int, where0: str
) -> tuple[np.ndarray, np.ndarray] | None:
    """(starts, ends) as float64 from the identity records; None if one cannot be framed
    (the scan names it). An image record among them contradicts the header."""
    starts = np.empty(offs.size)
    ends = np.empty(offs.size)
    for lo in range(0, offs.size, _CHUNK):
        part = offs[lo : lo + _CHUNK]
        h = _heads(rm, part)
        shaped = _identity_shaped(h, part, rm.size)
        if not shaped.all():
            j = int(np.argmin(shaped))
            if not _framed(h[j : j + 1], part[j : j + 1], rm.size)[0]:
                return None
            raise LayoutError(
                f"{where0}: puts identity records at keys {first_id}.., but record "
                f"key={first_id + lo + j} offset={int(part[j])} holds an image"
            )
        starts[lo : lo + part.size] = h["label0"]
        ends[lo : lo + part.size] = h["label1"]
        rm.release(int(part[0]), int(part[-1]) + recordio.HEAD.itemsize)
    return starts, ends


def _check_ranges(
    rec: str, starts: np.ndarray, ends: np.ndarray, first_id: int, offs: np.ndarray
) -> None:
    """Ranges ascending, disjoint, without gaps, covering keys ``1..first_id-1`` exactly."""

    def where(c: int) -> str:
        return f"{rec}: identity record key={first_id + c} offset={int(offs[c])}"

    def span(c: int) -> str:
        return f"[{starts[c]:.0f}, {ends[c]:.0f})"

    whole = (
        np.isfinite(starts)
        & (starts == np.floor(starts))
        & np.isfinite(ends)
        & (ends == np.floor(ends))
    )
    checks = [
        (~whole, lambda c: f"range ({starts[c]:g}, {ends[c]:g}) is not a pair of keys"),
        (ends < starts, lambda c: f"range {span(c)} runs backwards"),
        (
            np.r_[False, starts[1:] < ends[:-1]],
            lambda c: f"range {span(c)} overlaps the previous identity's {span(c - 1)}",
        ),
        (
            np.r_[False, starts[1:] > ends[:-1]],
            lambda c: (
                f"range {span(c)} leaves keys [{ends[c - 1]:.0f}, {starts[c]:.0f}) after "
                f"the previous identity's {span(c - 1)} without an identity"
            ),
        ),
    ]
    failing = [(int(np.argmax(mask)), n) for n, (mask, _) in enumerate(checks) if mask.any()]
    if failing:
        c, n = min(failing)
        raise LayoutError(f"{where(c)}: {checks[n][1](c)}")
    last = starts.size - 1
    if np.float32(ends[last]) != np.float32(first_id):
        what = (
            f"keys [{ends[last]:.0f}, {first_id}) before the first identity record have no identity"
            if ends[last] < first_id
            else f"it runs past key {first_id - 1}, the last image record"
        )
        raise LayoutError(f"{where(last)}: range {span(last)} ends the identities, but {what}")


def _bounds(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(least, greatest) integer that float32 rounds to each value (the value itself < 2^24)."""
    lo = values.astype(np.int64)
    hi = lo.copy()
    big = np.flatnonzero(values >= EXACT)
    for start in range(0, big.size, _CHUNK):
        at = big[start : start + _CHUNK]
        v = values[at]
        width = int(np.spacing(np.float32(v.max())))
        cand = v.astype(np.int64)[:, None] + np.arange(-width, width + 1)
        hit = cand.astype(np.float32) == v.astype(np.float32)[:, None]
        lo[at] = np.where(hit, cand, np.iinfo(np.int64).max).min(axis=1)
        hi[at] = np.where(hit, cand, -1).max(axis=1)
    return lo, hi


def window_keys(starts: np.ndarray, first_id: int) -> np.ndarray:
    """Sorted image keys whose identity float32-rounded range starts leave open.

    A start stored as ``v`` is one of the keys ``lo..hi`` that round to ``v``: key ``lo - 1``
    is surely before it and key ``hi`` surely at or after it, so ``lo..hi-1`` are open.
    """
    v = np.unique(starts[starts >= EXACT])
    parts = []
    for lo in range(0, v.size, _CHUNK):
        lo_k, hi_k = _bounds(v[lo : lo + _CHUNK])
        width = int((hi_k - lo_k).max()) + 1
        cand = lo_k[:, None] + np.arange(width)
        parts.append(cand[cand < hi_k[:, None]])
    keys = np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.int64)
    return keys[(keys >= 1) & (keys < first_id)]


def _window_labels(
    rm: recordio.FileMap, offsets: np.ndarray, wkeys: np.ndarray
) -> np.ndarray | None:
    """Labels of the image records ``wkeys`` from their own headers; None if one is bad."""
    labels = np.empty(wkeys.size, np.int64)
    if _sparse(offsets, wkeys):  # a page each, not the kernel's read-around of 128 KB a fault
        rm.advise(mmap.MADV_RANDOM)
    for lo in range(0, wkeys.size, _CHUNK):
        keys = wkeys[lo : lo + _CHUNK]
        offs = np.asarray(offsets[keys - 1])
        h = _heads(rm, offs)
        label = np.where(h["flag"] > 0, h["label0"], h["label"]).astype(np.float64)
        image = _framed(h, offs, rm.size) & (_payload(h)[1] > 0)
        for i in np.flatnonzero((h["lrec"] >> 29) == 1):  # split around a magic: read whole
            try:
                label[i] = recordio.image_record(rm.array, int(offs[i]))[0]
                image[i] = True
            except recordio.BadRecord:
                return None
        if not image.all():
            return None
        if not (np.isfinite(label) & (label >= 0) & (label == np.floor(label))).all():
            return None
        labels[lo : lo + keys.size] = label
        rm.release(int(offs[0]), int(offs[-1]) + recordio.HEAD.itemsize)
    return labels


def _sparse(offsets: np.ndarray, wkeys: np.ndarray) -> bool:
    """Whether runs of open keys lie further apart than the read-around of a page fault.

    With large records (WebFace42M: about 7 KB, a run every ~150 KB) a fault's read-around
    would read most of the file past key 2^24; small records (the benchmark's) put many runs
    in each read-around, which is then the cheaper way to read them.
    """
    if wkeys.size < 2:
        return False
    runs = 1 + int((np.diff(wkeys) > 1).sum())
    span = int(offsets[wkeys[-1] - 1]) - int(offsets[wkeys[0] - 1])
    return span / runs > _READ_AROUND


def check_window_labels(
    wkeys: np.ndarray, wlabels: np.ndarray, lo: np.ndarray, hi: np.ndarray
) -> tuple[int, int, int] | None:
    """(index, lowest, highest identity allowed) of the first window label that no rounding
    of the identity ranges allows, or None. ``lo``/``hi`` bound each identity's true start."""
    low = np.searchsorted(hi, wkeys, side="right") - 1
    high = np.searchsorted(lo, wkeys, side="right") - 1
    bad = np.flatnonzero((wlabels < low) | (wlabels > high))
    if bad.size:
        j = int(bad[0])
        return j, int(low[j]), int(high[j])
    return None


def assign_labels(
    keys: np.ndarray, starts: np.ndarray, wkeys: np.ndarray, wlabels: np.ndarray
) -> np.ndarray:
    """int32 labels of image ``keys``: the identity whose range holds each key, or the label
    read from the record where float32 rounding leaves it open (``wkeys``)."""
    labels = np.searchsorted(starts, keys, side="right") - 1
    if wkeys.size:
        j = np.minimum(np.searchsorted(wkeys, keys), wkeys.size - 1)
        hit = wkeys[j] == keys
        labels[hit] = wlabels[j[hit]]
    return labels.astype(np.int32)


def _integral(x: float) -> bool:
    return bool(np.isfinite(x) and x == np.floor(x))
