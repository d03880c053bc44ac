"""How the pipeline names things to a person, where more than one layer shows the same name (a picture's
caption and a table's cell): one owner, no drawing and no evaluation here, so both may import it."""
from __future__ import annotations


def cluster_caption(category_id: int, name: str | None = None) -> str:
    """How a cluster is named to a person: ``cluster_9 (id 10)`` (category name and id), or ``10``. The
    caption of its gallery (:mod:`pipeline.viz.gallery`) and its cell in the Hungarian table
    (:func:`pipeline.evaluation.hungarian.to_markdown`)."""
    return f"{name} (id {int(category_id)})" if name else str(int(category_id))
