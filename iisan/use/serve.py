"""A live endpoint for a trained run (``iisan serve``): FastAPI on uvicorn, bound to this
machine by default.

- ``GET /health``: the run, the catalogue size, the k by default, exact or ANN;
- ``GET /users/{user}/recommendations?k=10&keep_history=false``: a user of the run's dataset,
  after their whole known sequence (``recommend --users next``);
- ``POST /recommendations`` with ``{"history": [ASIN, ...], "k": 10}``: a new user.

The model and every item's embedding are loaded once; a request encodes one user and
scores the catalogue exactly (iisan.train.metrics.top_k, ties to the lower id, history left
out as ``recommend`` does) or, with ``--index``, through the faiss index. Unknown users and
ASINs, empty histories and k < 1 are 4xx errors that say what to send instead.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from iisan.core.errors import ConfigError
from iisan.data.prepared import left_pad
from iisan.train.metrics import top_k
from iisan.train.model import item_embeddings, user_embeddings
from iisan.use.recommend import read_sequences

log = logging.getLogger(__name__)


class Service:
    """A loaded run answering top-K requests."""

    def __init__(self, run_dir, data_dir=None, caches=None, device="cpu", index=None):
        from iisan.use.trained import load_run

        self.run = str(Path(run_dir))
        self.model, self.data, ckpt = load_run(run_dir, data_dir=data_dir, caches=caches, device=device)
        self.k = ckpt["train_config"]["metric_k"]
        self.table = item_embeddings(self.model, ckpt["train_config"]["eval_batch_size"], float32=False)
        self.items = self.table.float().cpu()
        self.sequences = dict(read_sequences(self.data))
        self.index = None
        if index:
            from iisan.use import index as ann

            self.index = ann.load(index)
            if self.index.ntotal != self.data.n_items:
                raise ConfigError(f"{index}: an index of {self.index.ntotal} items for a catalogue of "
                                  f"{self.data.n_items}\n  fix: make it from this run with `iisan embed --index "
                                  "faiss`")  # fmt: skip

    def health(self) -> dict:
        return {"status": "ok", "run": self.run, "items": self.data.n_items, "users": len(self.sequences),
                "k": self.k, "search": "faiss HNSW" if self.index is not None else "exact"}  # fmt: skip

    def ids_of(self, asins: list[str]) -> list[int]:
        unknown = [a for a in asins if a not in self.data.ids_by_asin]
        if unknown:
            raise LookupError(f"ASIN(s) {unknown[:5]} are not in the run's catalogue ({self.data.n_items} items)")
        return [self.data.ids_by_asin[a] for a in asins]

    def recommend(self, history: list[int], k: int | None, keep_history: bool = False) -> dict:
        k = min(k or self.k, self.data.n_items)
        inputs = torch.as_tensor(left_pad([history], self.data.max_len))
        with torch.no_grad():
            u = user_embeddings(self.model, inputs, 1, items=self.table).cpu()
        if self.index is not None:
            from iisan.use import index as ann

            scores, ids = ann.search(self.index, u.numpy(), k, None if keep_history else [set(history)])
            scores, ids = torch.from_numpy(scores), torch.from_numpy(ids)
        else:
            scores, ids = top_k(u, self.items, None if keep_history else torch.as_tensor([history]), k)
        d = self.data
        pairs = [(float(s), int(i)) for s, i in zip(scores[0], ids[0], strict=True) if i > 0]
        items = [{"rank": r + 1, "item_id": i, "asin": d.asins[i], "title": d.titles[i], "score": s}
                 for r, (s, i) in enumerate(pairs)]  # fmt: skip
        return {"k": k, "items": items}


def app(service: Service):
    """The FastAPI application over a loaded ``Service``."""
    from fastapi import Body, FastAPI, HTTPException, Query

    api = FastAPI(title="iisan", description=f"top-K recommendations of {service.run}")
    k_query = Query(None, ge=1, description="items to return (default: the run's metric_k)")

    @api.get("/health")
    def health() -> dict:
        return service.health()

    @api.get("/users/{user}/recommendations")
    def known_user(user: str, k: int | None = k_query, keep_history: bool = False) -> dict:
        if user not in service.sequences:
            raise HTTPException(404, f"user {user!r} is not in the run's dataset; POST /recommendations with "
                                     '{"history": [ASIN, ...]} for a new user')  # fmt: skip
        return {"user": user, **service.recommend(service.sequences[user], k, keep_history)}

    @api.post("/recommendations")
    def new_user(history: list[str] = Body(..., min_length=1, description="ASINs, oldest first"),  # noqa: B008
                 k: int | None = Body(None, ge=1), keep_history: bool = Body(False)) -> dict:  # fmt: skip
        try:
            ids = service.ids_of(history)
        except LookupError as e:
            raise HTTPException(422, f"{e}; send ASINs of the run's items") from e
        return service.recommend(ids, k, keep_history)

    return api


def serve(run_dir, host: str = "127.0.0.1", port: int = 8000, index=None, **run_args) -> None:
    """Load the run and answer requests until interrupted."""
    import uvicorn

    service = Service(run_dir, index=index, **run_args)
    log.info("serving %s on http://%s:%d (%d items, %s top-K); GET /health", service.run, host, port,
             service.data.n_items, service.health()["search"])  # fmt: skip
    uvicorn.run(app(service), host=host, port=port, log_level="warning")
