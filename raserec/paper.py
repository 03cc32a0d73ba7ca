"""Published figures (test set) that raserec is measured against (``../shared/REFERENCE.md``).

Keys are ``(dataset, row name)``; values map metric names (``test/HR@5`` ...) to fractions."""

from __future__ import annotations

_K4 = ("test/HR@5", "test/NDCG@5", "test/HR@10", "test/NDCG@10")


def _row(*values: float, keys: tuple[str, ...] = _K4) -> dict[str, float]:
    return dict(zip(keys, values, strict=True))


#: RaSeRec paper, Tables 2/8 (SASRec backbone; DuoRec = the pre-training recipe alone).
RASEREC: dict[tuple[str, str], dict[str, float]] = {
    ("Beauty", "SASRec (paper)"): _row(0.0365, 0.0236, 0.0627, 0.0281),
    ("Beauty", "DuoRec (paper)"): _row(0.0541, 0.0337, 0.0834, 0.0431),
    ("Beauty", "RaSeRec (paper)"): _row(0.0569, 0.0369, 0.0860, 0.0463),
    ("Sports", "DuoRec (paper)"): _row(0.0315, 0.0196, 0.0479, 0.0248),
    ("Sports", "RaSeRec (paper)"): _row(0.0331, 0.0211, 0.0497, 0.0264),
    ("Clothing", "DuoRec (paper)"): _row(0.0191, 0.0109, 0.0293, 0.0142),
    ("Clothing", "RaSeRec (paper)"): _row(0.0194, 0.0118, 0.0301, 0.0152),
    # Table 3 (Beauty, other backbones; HR@5 / NDCG@5 only).
    ("Beauty", "GRU4Rec (paper)"): _row(0.0164, 0.0086, keys=_K4[:2]),
    ("Beauty", "RaSeRec on GRU4Rec (paper)"): _row(0.0469, 0.0322, keys=_K4[:2]),
    ("Beauty", "BERT4Rec (paper)"): _row(0.0193, 0.0187, keys=_K4[:2]),
    ("Beauty", "RaSeRec on BERT4Rec (paper)"): _row(0.0534, 0.0344, keys=_K4[:2]),
}

#: The (encoder, RaSeRec) paper rows an experiment on ``(dataset, backbone)`` is compared with.
PAIRS: dict[tuple[str, str], tuple[str, str]] = {
    ("Beauty", "sasrec"): ("DuoRec (paper)", "RaSeRec (paper)"),
    ("Sports", "sasrec"): ("DuoRec (paper)", "RaSeRec (paper)"),
    ("Clothing", "sasrec"): ("DuoRec (paper)", "RaSeRec (paper)"),
    ("Beauty", "gru4rec"): ("GRU4Rec (paper)", "RaSeRec on GRU4Rec (paper)"),
    ("Beauty", "bert4rec"): ("BERT4Rec (paper)", "RaSeRec on BERT4Rec (paper)"),
}

#: Ada-Retrieval paper, Table 2 (top-50, fractions): (Ada HR@50, Ada NDCG@50, base HR@50, base NDCG@50).
ADA: dict[str, tuple[float, float, float, float]] = {
    "Beauty": (0.17741, 0.07062, 0.17110, 0.06506),
    "Sports": (0.11352, 0.04234, 0.10924, 0.04046),
    "Yelp": (0.12637, 0.03852, 0.12062, 0.03770),
}
