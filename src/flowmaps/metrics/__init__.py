"""Sample-quality metrics; every name is importable from ``flowmaps.metrics``.

- ``flowmaps.metrics.samples``: metrics of sample sets against reference samples or a known density
  (energy distance, MMD, sliced Wasserstein, the checkerboard's histogram KL), the flow-map error
  against the exact map, and network-evaluation counting (``NFECounter``).
- ``flowmaps.metrics.images``: image metrics in a classifier's feature space: Fréchet distance,
  precision and recall (Kynkäänniemi et al. 2019), class accuracy, and ``ImageMetrics`` against a
  real test split with its floor.
- ``flowmaps.metrics.classifier``: the in-project feature classifier, trained once per data set with
  a fixed seed and cached with its test accuracy (``load_or_train_classifier``).
- ``flowmaps.metrics.inception``: Inception-v3 features for an Inception FID through the ``fid`` extra
  (``InceptionFeatures``; not comparable with published FIDs).
"""

from flowmaps.metrics.classifier import (
    CachedClassifier,
    FeatureCNN,
    cache_entry,
    default_cache_dir,
    load_or_train_classifier,
    train_classifier,
)
from flowmaps.metrics.images import (
    FeatureClassifier,
    ImageMetrics,
    class_accuracy,
    frechet_distance,
    inside_share,
    knn_radii,
    precision_recall,
)
from flowmaps.metrics.inception import InceptionFeatures, import_fid_helper
from flowmaps.metrics.samples import (
    HIST_ESTIMATORS,
    MMD_BANDWIDTHS,
    FlowMapError,
    FlowMapReference,
    NFECounter,
    checkerboard_bin_probs,
    energy_distance,
    flow_map_error,
    flow_map_reference,
    histogram,
    histogram_kl,
    mmd,
    sliced_wasserstein,
    time_pair_grid,
)

__all__ = [
    "HIST_ESTIMATORS", "MMD_BANDWIDTHS", "CachedClassifier", "FeatureCNN", "FeatureClassifier", "FlowMapError",
    "FlowMapReference", "ImageMetrics", "InceptionFeatures", "NFECounter", "cache_entry", "checkerboard_bin_probs",
    "class_accuracy", "default_cache_dir", "energy_distance", "flow_map_error", "flow_map_reference", "frechet_distance",
    "histogram", "histogram_kl", "import_fid_helper", "inside_share", "knn_radii", "load_or_train_classifier", "mmd",
    "precision_recall", "sliced_wasserstein", "time_pair_grid", "train_classifier",
]
