"""Hash n-gram embeddings (paper §3.2.1, eq. 4-6).

For every position t and every n in `ngram_sizes`, the n token ids ending at t (left-padded
with 0 = BOE) are hashed with a rolling polynomial hash,

    hash_f(g) = sum_j g_j * prime_f ** j     (j = 0 for the oldest id; int64, wrapping)

and reduced modulo the number of rows. Each (hash function f, n) pair owns a table; like the
HF port we store them as one fused table with row offsets, so an n-gram of table i looks up
row i * rows + hash. The hash values equal the official code's for the same input.

With document masking (BLT_LLM.md §8.1) an n-gram does not reach back across the start of its
document: the ids before it count as 0, as before a row's start (the official code hashes
across; then the last bytes of one document would change the next one's first embeddings).
"""

import torch
from torch import nn

PRIMES = (
    1000000007,
    5915587277,
    1500450271,
    3267000013,
    5754853343,
    4093082899,
    9576890767,
    3628273133,
    2860486313,
    5463458053,
    3367900313,
)


def ngram_hash(ids: torch.Tensor, n: int, prime: int, rows: int, doc_pos: torch.Tensor | None = None) -> torch.Tensor:
    """(B,T) token ids -> (B,T) hash of the n-gram ending at each position, in [0, rows).
    doc_pos: (B,T) position of each byte within its document; ids before it count as 0."""
    ids = ids.long()
    pad = torch.zeros(ids.shape[0], n - 1, dtype=torch.long, device=ids.device)
    windows = torch.cat([pad, ids], dim=1).unfold(1, n, 1)  # (B,T,n), oldest first
    if doc_pos is not None:  # element j of a window lies n-1-j positions back
        back = torch.arange(n - 1, -1, -1, device=ids.device)
        windows = torch.where(back <= doc_pos[..., None], windows, 0)
    powers = torch.tensor(prime, dtype=torch.long, device=ids.device) ** torch.arange(n, device=ids.device)
    return (windows * powers).sum(-1) % rows  # torch's % is non-negative for positive rows


class HashNgramEmbedding(nn.Module):
    def __init__(self, dim: int, ngram_sizes: list[int], rows: int, functions: int):
        super().__init__()
        self.ngram_sizes, self.rows, self.functions = list(ngram_sizes), rows, functions
        self.num_tables = functions * len(self.ngram_sizes)
        self.weight = nn.Parameter(torch.empty(self.num_tables * rows, dim))

    def indices(self, ids: torch.Tensor, doc_pos: torch.Tensor | None = None) -> torch.Tensor:
        """(B,T) -> (B,T,num_tables) rows of the fused table (doc_pos: as ngram_hash)."""
        out = []
        for f in range(self.functions):
            prime = PRIMES[f % len(PRIMES)]
            for n in self.ngram_sizes:
                out.append(ngram_hash(ids, n, prime, self.rows, doc_pos) + len(out) * self.rows)
        return torch.stack(out, dim=-1)

    def forward(self, ids: torch.Tensor, doc_pos: torch.Tensor | None = None) -> torch.Tensor:
        """(B,T) -> (B,T,D): the sum over all tables of each position's n-gram embedding."""
        return nn.functional.embedding(self.indices(ids, doc_pos), self.weight).sum(dim=-2)
