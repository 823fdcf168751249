"""Draw the JANUS decoder self-attention mask of the paper's 6-token example (docs/attention.md).

    python docs/draw_mask.py

Target y1..y6 with y2, y3 and y5 masked (JANUS paper §3.1). Everything printed comes from
``janus.streams.build_streams``: token names, segments, order indices, positions and the mask
itself, so the drawing in docs/attention.md is what the code builds today (tests/test_docs.py
checks that the two agree).
"""
from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from janus import streams as S

# Two-letter segment codes used in the drawing.
SEGMENT_CODES = {S.AR_CONTENT: "ac", S.AR_QUERY: "aq", S.UNMASKED: "un", S.MASK_SLOT: "mk",
                 S.TRUE_SLOT: "tr", S.QUERY: "qu", S.PAD: "pd"}
# Token names by segment: the start token is b; y = a real target token, m = a <mask> in the
# content stream, t = a true target token in the compensation block, q = a query.
_NAME_PREFIX = {S.AR_CONTENT: "y", S.AR_QUERY: "q", S.UNMASKED: "y", S.MASK_SLOT: "m",
                S.TRUE_SLOT: "t", S.QUERY: "q", S.PAD: "pad"}

PAD_ID, MASK_ID, START_ID = 1, 99, 2


def papers_example() -> tuple[torch.Tensor, torch.Tensor]:
    """labels y1..y6 (ids 11..16) and the decoder mask of y2, y3, y5."""
    labels = torch.tensor([[11, 12, 13, 14, 15, 16]])
    decoder_mask = torch.tensor([[False, True, True, False, True, False]])
    return labels, decoder_mask


def _name(segment: int, position: int) -> str:
    if segment == S.AR_CONTENT and position == 0:
        return "b"
    if segment == S.PAD:
        return "pad"
    return f"{_NAME_PREFIX[segment]}{position}"


def _table(title: str, names: list[str], segs: list[int], ks: list[int], poss: list[int], mask: torch.Tensor,
           blocks: list[int], notes: dict[int, str]) -> list[str]:
    """One half as text: header rows of attributes, then one row per token (# = may attend)."""
    width = 4
    label_width = 10
    cuts = set()
    edge = 0
    for b in blocks[:-1]:
        edge += b
        cuts.add(edge)

    def row(label: str, cells: list[str]) -> str:
        out = label.ljust(label_width)
        for c, cell in enumerate(cells):
            if c in cuts:
                out += "| "
            out += cell.ljust(width)
        return out.rstrip()

    lines = [title, ""]
    lines.append(row("", names))
    lines.append(row("segment", [SEGMENT_CODES[s] for s in segs]))
    lines.append(row("k", ["-" if k < 0 else str(k) for k in ks]))
    lines.append(row("position", [str(p) for p in poss]))
    lines.append("")
    for r, name in enumerate(names):
        text = row(name, ["#" if mask[r, c] else "." for c in range(len(names))])
        if r in notes:
            text = text.ljust(label_width + width * len(names) + 2 * len(cuts) + 1) + notes[r]
        lines.append(text.rstrip())
    return lines


def draw_papers_example() -> str:
    """The AR half and the NAR/AUX half of the paper's example, as built by build_streams."""
    labels, decoder_mask = papers_example()
    s = S.build_streams(labels, decoder_mask, pad_id=PAD_ID, mask_id=MASK_ID, start_id=START_ID)
    N, M = labels.shape[1], s.num_masked_max
    # DecoderStreams keeps segments and positions but not the order index k: rebuild k from the
    # layout and check that it gives back exactly the mask build_streams made.
    order_k = torch.tensor([_order_index(s, r) for r in range(s.tokens.shape[0])])
    if not torch.equal(S.attention_mask_from_attributes(s.segments, order_k), s.self_mask):
        raise AssertionError("the order indices drawn do not reproduce build_streams' mask")
    out: list[str] = ["# = the row may attend the column, . = it may not (one mask for every layer and head).",
                      "Rows marked -> are the outputs the losses use.", ""]
    halves = (("AR pattern (batch row 0): [content (N=%d) | query (N=%d)]" % (N, N), 0, [N, N]),
              ("NAR + AUX pattern (batch row 1): [target with masks, in place (N=%d) | true tokens (M=%d) | "
               "queries (M=%d)]" % (N, M, M), s.batch_size, [N, M, M]))
    for title, r, blocks in halves:
        segs = s.segments[r].tolist()
        poss = s.positions[r].tolist()
        ks = order_k[r].tolist()
        names = [_name(seg, pos) for seg, pos in zip(segs, poss)]
        notes: dict[int, str] = {}
        rows = s.out_rows[r].tolist()
        if r == 0:
            for i, row in enumerate(rows[:N]):
                notes[row] = f"-> AR logits for y{i + 1}"
        else:
            order = s.masked_order[0].tolist()
            if s.has_nar:
                for k, row in enumerate(rows[:M]):
                    notes[row] = f"-> NAR logits for y{order[k] + 1}"
            if s.has_aux:
                for k, row in enumerate(rows[s.aux_offset:s.aux_offset + M]):
                    notes[row] = f"-> AUX logits for y{order[k] + 1}"
        out += _table(title, names, segs, ks, poss, s.self_mask[r, 0], blocks, notes)
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def _order_index(s: S.DecoderStreams, r: int) -> list[int]:
    """The masked-order index k of every token of batch row ``r``, recovered from the layout:
    AR tokens carry their slot index, masked tokens their rank left to right, the rest -1."""
    segs = s.segments[r]
    L = segs.shape[0]
    ks = torch.full((L,), -1, dtype=torch.long)
    if r < s.batch_size and s.has_ar:
        N = int((segs == S.AR_CONTENT).sum())
        idx = torch.arange(N)
        ks[:N], ks[N:2 * N] = idx, idx
        return ks.tolist()
    masked = segs == S.MASK_SLOT
    ks[masked] = torch.arange(int(masked.sum()))
    for seg in (S.TRUE_SLOT, S.QUERY):
        here = segs == seg
        ks[here] = torch.arange(int(here.sum()))
    return ks.tolist()


def main() -> None:
    print(draw_papers_example(), end="")


if __name__ == "__main__":
    main()
