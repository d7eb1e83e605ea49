"""Weight coding, as in Deep Compression: k-means weight sharing (``cluster_``) and a
Huffman-coded storage format (``encode`` / ``decode``)."""

from slimkit.compress.api import cluster_
from slimkit.compress.cluster import ClusterConfig, SharedWeights, kmeans_1d
from slimkit.compress.codec import decode, describe, encode
from slimkit.prune.magnitude import make_permanent_

__all__ = ["ClusterConfig", "SharedWeights", "cluster_", "decode", "describe", "encode", "kmeans_1d",
           "make_permanent_"]
