"""Small speech models for tutorials, benchmarks and tests: a Conformer CTC model and an LSTM CTC model."""

from mbclip.models import relpos_sampler  # noqa: F401  (registers the attention sampler)
from mbclip.models.conformer import ConformerEncoder, RelPositionMultiHeadAttention, rel_shift
from mbclip.models.ctc import LSTMCTC, ConformerCTC

__all__ = ["ConformerCTC", "ConformerEncoder", "LSTMCTC", "RelPositionMultiHeadAttention", "rel_shift"]
