"""Stage `mtkit explore` and the server's /v1/explain: one sentence's translation laid open, as JSON.

What the Explorer page draws, every number from the real model and the real search: the source
and output subwords; the search as a tree (every candidate it weighed, and whether it lived on,
finished or was pruned), beam search's and greedy search's side by side; the cross-attention and
both self-attentions of the winning hypothesis. All of it is recorded by the search as it runs
(search.Trace), not recomputed. "What if" scores a translation the user gives: the model reads it
(teacher forcing, the same forward pass that training uses) and says how likely each of its
subwords was, and what it would have chosen instead.
"""

import json
import math
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from mtkit.config import DecodeSection
from mtkit.console import console, info
from mtkit.corpus import normalize
from mtkit.errors import MtkitError
from mtkit.files import check_output, output_file
from mtkit.search import BeamStep, GreedyStep, Hypothesis, Trace, length_penalty, max_lengths
from mtkit.tokenizer import Tokenizer

if TYPE_CHECKING:  # named in annotations only: a stage does not import another stage
    from mtkit.translate import Translator

MAX_BEAM = 16  # a wider tree is unreadable, and its attention records grow with the beam


class BadInput(MtkitError):
    """A request the Explorer cannot answer; `field` names what to change (the request's field, the
    API's setting: the CLI names its flag)."""

    def __init__(self, field: str, message: str):
        super().__init__(message, setting=field)
        self.field = field


def explain(translator: "Translator", line: str, opts: DecodeSection, whatif: str | None = None,
            target_lang: str | None = None) -> dict:
    """Everything the Explorer shows for one sentence, searched with `opts` (beam and greedy);
    target_lang: for a model of several target languages, which one."""
    if opts.beam_size > MAX_BEAM:
        raise BadInput("beam_size", f"beam_size {opts.beam_size}: the Explorer draws at most {MAX_BEAM} beams")
    try:
        ids = translator.encode([line], target_lang)[0]
    except MtkitError as e:  # a model of several target languages, and none or an unknown one named
        raise BadInput("target_lang", e.message) from None
    if not ids:
        raise BadInput("text", "nothing to explain: the sentence is empty")
    warnings = []
    if len(ids) > translator.max_source_tokens:
        warnings.append(f"the sentence has {len(ids)} subwords, more than the model's {translator.max_source_tokens}: "
                        f"only its first {translator.max_source_tokens} were translated")
        ids = ids[:translator.max_source_tokens]
    runs = {}
    for name, beam in (("beam", opts.beam_size), ("greedy", 1)):
        if name == "greedy" and beam == opts.beam_size:
            runs["greedy"] = runs["beam"]  # beam 1 is greedy search: one search, shown twice
            continue
        trace = Trace()
        settings = opts.model_copy(update={"beam_size": beam, "n_best": beam})
        hyps = translator.search([ids], settings, attention=name == "beam", trace=trace)[0]  # the winner's attention
        runs[name] = (hyps, trace)
    tok = translator.tokenizer
    (best, *_), trace = runs["beam"]
    result = {
        "source": {"text": line, "ids": ids + [tok.eos_id], "pieces": tok.src_pieces(ids) + ["</s>"]},
        "eos_id": tok.eos_id,  # what ends every hypothesis (its ids leave it out)
        "settings": {"beam_size": opts.beam_size, "alpha": opts.alpha,
                     "max_len": _limit(translator, ids, opts)},
        "beam": _run(*runs["beam"], tok, opts.alpha),
        "greedy": _run(*runs["greedy"], tok, opts.alpha),  # its own tree, even when the same search
        "attention": {"cross": _rows(best.attention.permute(1, 2, 0, 3)),  # (L, H, T + 1, S + 1)
                      "decoder": _rows(best.self_attention.permute(1, 2, 0, 3)),  # (L, H, T + 1, T + 1)
                      "encoder": _rows(torch.stack(trace.encoder)[:, 0])},  # (L, H, S + 1, S + 1)
        "warnings": warnings,
    }
    result["parting"] = parting(result["beam"], result["greedy"], tok.eos_id)
    for n in result["beam"]["tree"] + result["greedy"]["tree"]:
        del n["path"]  # the tokens so far: a key while building, redundant in the answer (parent links)
    if whatif is not None:
        result["whatif"] = what_if(translator, ids, whatif, opts)
    return result


def _limit(translator: "Translator", ids: list[int], opts: DecodeSection) -> int:
    """The most subwords the search lets this sentence's output have (EOS not counted)."""
    return int(max_lengths(torch.tensor([len(ids) + 1]), opts.max_len_a, opts.max_len_b,
                           translator.model.cfg.max_positions - 1)[0])


def _run(hyps: list[Hypothesis], trace: Trace, tok: Tokenizer, alpha: float) -> dict:
    """One search: its finished hypotheses (best first) and its tree."""
    if isinstance(trace.steps[0], GreedyStep):
        tree = _greedy_tree(trace.steps, tok, hyps[0])
    else:
        tree = _beam_tree(trace.steps, tok)
    winner = tuple(hyps[0].tokens) + (tok.eos_id,)
    node = next(n for n in tree if n["fate"] == "finished" and tuple(n["path"]) == winner)
    while node is not None:
        node["best"] = True
        node = tree[node["parent"]] if node["parent"] is not None else None
    texts = tok.decode_tgt([h.tokens for h in hyps])
    return {"translation": texts[0],
            "hypotheses": [{"text": t, "ids": h.tokens, "pieces": tok.tgt_pieces(h.tokens) + ["</s>"], "score": h.score,
                            "log_prob": h.log_prob, "length": len(h.tokens) + 1,
                            "penalty": length_penalty(len(h.tokens) + 1.0, alpha)} for h, t in zip(hyps, texts)],
            "tree": tree}


def parting(beam: dict, greedy: dict, eos_id: int) -> dict | None:
    """Where greedy's translation leaves beam search's (None: they agree), and what beam search
    did with greedy's subword there: weighed and pruned it, kept it alive, finished it, had it
    when it stopped, or never had it among its best candidates ("unseen")."""
    ours, theirs = beam["hypotheses"][0]["ids"] + [eos_id], greedy["hypotheses"][0]["ids"] + [eos_id]
    at = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
    if at is None:
        return None
    fates = {tuple(n["path"]): n["fate"] for n in beam["tree"]}
    return {"at": at, "greedy_fate": fates.get(tuple(theirs[:at + 1]), "unseen"),
            "greedy_finished_in_beam": tuple(theirs) in fates}


def _node(tree: list[dict], path: tuple, parent: int | None, piece: str, log_prob: float, fate: str,
          score: float | None = None, token: int | None = None) -> dict:
    node = {"id": len(tree), "parent": parent, "step": len(path), "token": path[-1] if path else token,
            "piece": piece, "log_prob": log_prob, "fate": fate, "score": score, "best": False, "path": path}
    tree.append(node)
    return node


def _root(tree: list[dict], tok: Tokenizer) -> None:
    """The start of every hypothesis: the token the decoder starts from."""
    _node(tree, (), None, tok.tgt_pieces([tok.bos_id])[0], 0.0, "root", token=tok.bos_id)


def _beam_tree(steps: list[BeamStep], tok: Tokenizer) -> list[dict]:
    """Beam search's steps (of one sentence) as a tree: one node per candidate it weighed, keyed
    by its tokens. A candidate lived on if it is among the next step's beams; after the last step
    (K hypotheses finished, or the length limit) the unfinished ones were "stopped", not pruned."""
    tree: list[dict] = []
    _root(tree, tok)
    at = {(): 0}
    for t, step in enumerate(steps):
        following = steps[t + 1] if t + 1 < len(steps) else None
        next_beams = set() if following is None else {
            tuple(row) for row, s in zip(following.beams.tolist(), following.beam_scores[0].tolist()) if math.isfinite(s)}
        names = tok.tgt_pieces(step.candidates[:, -1].tolist())
        for c, (row, score, filed) in enumerate(zip(step.candidates.tolist(), step.scores[0].tolist(),
                                                    step.filed[0].tolist())):
            if not math.isfinite(score):
                continue
            path = tuple(row)
            fate = "finished" if math.isfinite(filed) else "kept" if path in next_beams else \
                "pruned" if following is not None else "stopped"  # the search ended with this step
            node = _node(tree, path, at[path[:-1]], names[c], score, fate, filed if fate == "finished" else None)
            at[path] = node["id"]
    return tree


def _greedy_tree(steps: list[GreedyStep], tok: Tokenizer, found: Hypothesis) -> list[dict]:
    """Greedy search's steps (of one sentence) as a chain: at each step the token it took and the
    most likely others (pruned). The last node is the hypothesis itself, with its score: an EOS
    forced by the length limit costs nothing (see search.greedy)."""
    tree: list[dict] = []
    _root(tree, tok)
    parent, path, total = 0, (), 0.0
    for step in steps[:len(found.tokens) + 1]:
        token, gained = int(step.token[0]), float(step.log_prob[0])
        for lp, other in zip(step.top_log_probs[0].tolist(), step.top_ids[0].tolist()):
            if other != token:
                _node(tree, path + (other,), parent, tok.tgt_pieces([other])[0], total + lp, "pruned")
        path, total = path + (token,), total + gained
        if token == tok.eos_id:
            _node(tree, path, parent, "</s>", found.log_prob, "finished", found.score)
        else:
            parent = _node(tree, path, parent, tok.tgt_pieces([token])[0], total, "kept")["id"]
    return tree


def what_if(translator: "Translator", ids: list[int], text: str, opts: DecodeSection) -> dict:
    """How the model scores a translation of source `ids` that the user gives: each subword's
    log-probability given the ones before it, what the model would have chosen there instead,
    and the whole one's score, as the search scores its hypotheses."""
    target = translator.tokenizer.encode_tgt([normalize(text)])[0]
    if not target:
        raise BadInput("translation", "the what-if translation is empty: type the translation to score")
    limit = _limit(translator, ids, opts)
    if len(target) > limit:
        raise BadInput("translation", f"the what-if translation has {len(target)} subwords; the search lets "
                                      f"this sentence's translation have at most {limit}")
    log_probs = translator.read(ids, target)  # (T + 1, V)
    tok = translator.tokenizer
    at_limit = len(target) == limit
    if at_limit:  # out of room: the search forces EOS there, and it costs nothing (search.candidates)
        log_probs[-1] = float("-inf")
        log_probs[-1, tok.eos_id] = 0.0
    gold = torch.tensor(target + [tok.eos_id])
    given = log_probs.gather(1, gold[:, None])[:, 0]
    choice = log_probs.max(dim=-1)
    parts = next((i for i, (g, c) in enumerate(zip(gold.tolist(), choice.indices.tolist())) if g != c), None)
    total = given.sum().item()
    pieces = tok.tgt_pieces
    return {"text": text, "log_prob": total, "score": total / length_penalty(len(target) + 1.0, opts.alpha),
            "length": len(target) + 1, "parts_at": parts, "at_limit": at_limit,
            "tokens": [{"id": g, "piece": p, "log_prob": lp, "choice": c, "choice_piece": cp, "choice_log_prob": clp}
                       for g, p, lp, c, cp, clp in zip(gold.tolist(), pieces(target) + ["</s>"], given.tolist(),
                                                       choice.indices.tolist(), pieces(choice.indices.tolist()),
                                                       choice.values.tolist())]}


def _rows(weights: torch.Tensor) -> list:
    """Attention weights as nested lists, to 4 decimals (the page shows shades, not digits)."""
    return ((weights.float().cpu() * 1e4).round() / 1e4).tolist()


def explorer_page(live: bool, data: dict | None = None) -> str:
    """The Explorer as one HTML file, its style and script inlined (no network needed): live, it
    asks the server that serves it; else it shows `data`, an explain() answer embedded in it."""
    folder = resources.files("mtkit") / "explorer"
    html = (folder / "explorer.html").read_text(encoding="utf-8")

    def embed(value) -> str:  # JSON inside <script>: "</script>" or "<!--" in a sentence would break out
        return json.dumps(value, ensure_ascii=False).replace("<", "\\u003c")

    for mark, text in (("/*STYLE*/", (folder / "explorer.css").read_text(encoding="utf-8")),
                       ("/*SCRIPT*/", (folder / "explorer.js").read_text(encoding="utf-8")),
                       ("/*MODE*/", embed({"live": live})), ("/*DATA*/", embed(data))):  # the user's text last
        html = html.replace(mark, text, 1)
    return html


def explore_page(translator: "Translator", line: str, output: Path, whatif: str | None = None,
                 target_lang: str | None = None, **settings) -> dict:
    """`mtkit explore`: explain one sentence and write the Explorer page with the answer in it."""
    check_output(output, example="explorer.html")  # said before the work, not after it
    found = explain(translator, line, translator.options(**settings), whatif, target_lang)
    try:
        with output_file(output) as name:
            name.write_text(explorer_page(live=False, data=found), encoding="utf-8")
    except OSError as e:
        raise MtkitError(f"cannot write the output {output}: {e.strerror}",
                         hint="check that its folder exists and is writable", setting="output") from None
    for warning in found["warnings"]:
        console.print(f"[yellow]warning:[/] {warning}")
    info(f"{found['beam']['translation']}  (score {found['beam']['hypotheses'][0]['score']:.3f})")
    info(f"explorer -> {output} (open it in a browser; no network needed)")
    return found
