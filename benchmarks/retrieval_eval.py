r"""Full-catalog evaluation at scale: 1M candidates x 10k queries in bounded memory.

  python -m benchmarks.retrieval_eval [--candidates=1000000] [--queries=10000]
      [--dim=64] [--chunk=65536] [--seen=50]

Candidates are made chunk by chunk (seeded, as a candidate tower would make
them), so they never all sit in memory; each query has --seen excluded items
and one held-out item. Prints wall time, peak RSS and the metrics. Scoring
every query against the whole catalog at once would take queries x
candidates x 4 bytes (40 GB here).
"""

import json
import resource
import time

from absl import app, flags
import numpy as np

from trainer.metrics import retrieval as retrieval_metrics

_CANDIDATES = flags.DEFINE_integer("candidates", 1_000_000, "Catalog size.")
_QUERIES = flags.DEFINE_integer("queries", 10_000, "Queries.")
_DIM = flags.DEFINE_integer("dim", 64, "Embedding width.")
_CHUNK = flags.DEFINE_integer("chunk", 65536, "Candidates per chunk.")
_SEEN = flags.DEFINE_integer("seen", 50, "Excluded items per query.")


def _peak_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv):
  del argv
  n, q, d = _CANDIDATES.value, _QUERIES.value, _DIM.value
  rng = np.random.default_rng(0)
  queries = rng.normal(size=(q, d)).astype(np.float32)
  targets = rng.integers(0, n, q)
  seen_q = np.repeat(np.arange(q), _SEEN.value)
  seen_i = rng.integers(0, n, q * _SEEN.value)
  chunk = _CHUNK.value

  def candidates(start, end):
    # The same rows whenever a chunk is asked for (both passes).
    out = np.random.default_rng([1, start]).normal(size=(end - start, d))
    # Plant the held-out items near their queries so the metrics are not 0.
    inside = np.flatnonzero((targets >= start) & (targets < end))
    out[targets[inside] - start] = 0.5 * queries[inside] + out[
        targets[inside] - start]
    return out.astype(np.float32)

  before = _peak_mib()
  t0 = time.time()
  out = retrieval_metrics.streaming_metrics(
      queries, candidates, n, targets, seen_q, seen_i, ks=(10, 100),
      chunk=chunk)
  seconds = time.time() - t0
  result = {"candidates": n, "queries": q, "dim": d, "chunk": chunk,
            "seconds": round(seconds, 1),
            "peak_rss_mib": round(_peak_mib(), 1),
            "peak_rss_before_mib": round(before, 1),
            "all_scores_at_once_gib": round(n * q * 4 / 2**30, 1),
            **{k: round(v, 4) for k, v in out.items()}}
  print(json.dumps(result, indent=1))


if __name__ == "__main__":
  app.run(main)
