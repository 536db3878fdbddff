"""byom_lab.adaptation: the methods that use data, beside the data-free ones in byom_lab.merging.

`statistics` computes (and caches) what Fisher merging and RegMean need from training images;
`adamerging` and `tinting` adapt on unlabeled test images, building θ(λ) functionally (`weights`)
and caching each run with its measured cost (`runs`); `protocol` chooses TALL masks' λ_t and
Consensus's λ on validation and runs every data-using method the way the table reports it.
"""
from .adamerging import REFERENCE as ADAMERGING_REFERENCE
from .adamerging import AdaMergingConfig, adamerging, adamerging_plus, entropy
from .results import AdaMergingResult, TintingResult
from .statistics import fisher_statistics, gram_statistics
from .tinting import REFERENCE as TINTING_REFERENCE
from .tinting import TintingConfig, pseudo_labels, tinting, tinting_loss, tinting_plus
from .weights import TaskVectorStack, adaptation_images, features, ties_vectors

__all__ = ["ADAMERGING_REFERENCE", "AdaMergingConfig", "AdaMergingResult", "TINTING_REFERENCE", "TaskVectorStack",
           "TintingConfig", "TintingResult", "adamerging", "adamerging_plus", "adaptation_images", "entropy",
           "features", "fisher_statistics", "gram_statistics", "pseudo_labels", "ties_vectors", "tinting",
           "tinting_loss", "tinting_plus"]
