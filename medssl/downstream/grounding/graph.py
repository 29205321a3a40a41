"""A label-free anatomy tree: body -> organ-level regions -> their parts, each node with a text prompt.

Built from unlabelled training volumes: voxels inside the body (`medssl.data.body`) are described by
the frozen pretrained encoder's multi-scale features (standardised, scaled to unit total variance) and
their normalised RAS body coordinates (standardised, scaled to `coord_weight`^2 total variance), and
k-means (scikit-learn) groups them into `regions` organ-level regions. Each region splits into parts at
the medians of its voxels' body coordinates along the configured axes (upper / lower, left / right,
anterior / posterior), so the tree nests by spatial inclusion. Prompts are label-free: a region is named
by where it lies in the body ("upper right anterior region"), a part by its side within the region
("upper left part of the upper right anterior region").

Level 0 is the body, level 1 the regions, level 2 the parts; `assign` gives every voxel of a volume its
node at each level, in any volume (nearest centroid, then the stored medians). The tree is stored in the
grounding checkpoint (`to_dict`, plain lists). Label maps are read only by `best_region_dice`, to report
how well the regions match the organs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.cluster import KMeans

PART_AXES = {"upper_lower": (2, ("lower", "upper")), "left_right": (0, ("left", "right")),
             "anterior_posterior": (1, ("posterior", "anterior"))}


def _describe(mean: np.ndarray) -> str:
    """Where a region lies in the body, from its mean normalised RAS coordinates (x right, y anterior, z up)."""
    x, y, z = mean
    words = ["upper" if z > 2 / 3 else "lower" if z < 1 / 3 else "middle",
             "right" if x > 0.6 else "left" if x < 0.4 else "central",
             "anterior" if y > 0.6 else "posterior" if y < 0.4 else ""]
    return " ".join(w for w in words if w) + " region"


@dataclass
class AnatomyGraph:
    """Centroids (K, F + 3) in the scaled [features, coordinates] space, the scaling, part medians (K, n_parts)."""

    centroids: np.ndarray
    feature_mean: np.ndarray
    feature_std: np.ndarray
    coord_mean: np.ndarray
    coord_std: np.ndarray
    coord_weight: float
    parts: list[str]
    medians: np.ndarray
    region_prompts: list[str]

    # ------------------------------------------------------------------ build

    @classmethod
    def build(cls, features: list[np.ndarray], coords: list[np.ndarray], bodies: list[np.ndarray], *,
              regions: int, parts: list[str], voxels_per_volume: int, coord_weight: float, seed: int) -> AnatomyGraph:
        """features[i] (F, d, h, w), coords[i] (3, d, h, w) normalised RAS body coordinates, bodies[i]
        (d, h, w) bool."""
        rng = np.random.default_rng(seed)
        f_rows, c_rows = [], []
        for feat, coord, body in zip(features, coords, bodies):
            index = np.flatnonzero(body)
            index = rng.choice(index, size=min(len(index), voxels_per_volume), replace=False)
            f_rows.append(feat.reshape(feat.shape[0], -1)[:, index].T)
            c_rows.append(coord.reshape(3, -1)[:, index].T)
        f, c = np.concatenate(f_rows), np.concatenate(c_rows)
        graph = cls(np.zeros((0, f.shape[1] + 3)), f.mean(0), f.std(0) + 1e-6, c.mean(0), c.std(0) + 1e-6,
                    float(coord_weight), list(parts), np.zeros((0, len(parts))), [])
        points = graph._scaled(f, c)
        kmeans = KMeans(n_clusters=regions, n_init=4, random_state=seed).fit(points)
        graph.centroids = kmeans.cluster_centers_
        labels = kmeans.labels_
        graph.medians = np.array([[np.median(c[labels == k, PART_AXES[part][0]]) if (labels == k).any() else 0.5
                                   for part in parts] for k in range(regions)])
        graph.region_prompts = [_describe(c[labels == k].mean(0)) if (labels == k).any() else "empty region"
                                for k in range(regions)]
        return graph

    def _scaled(self, f: np.ndarray, c: np.ndarray) -> np.ndarray:
        """Rows (N, F) features and (N, 3) coordinates -> (N, F + 3) clustering space."""
        f = (f - self.feature_mean) / self.feature_std / np.sqrt(f.shape[1])
        c = (c - self.coord_mean) / self.coord_std * self.coord_weight / np.sqrt(3)
        return np.concatenate([f, c], axis=1).astype(np.float32)

    # ------------------------------------------------------------------ the tree

    @property
    def regions(self) -> int:
        return len(self.centroids)

    @property
    def part_names(self) -> list[str]:
        """Names of the parts of a region, in part-index order (e.g. "lower left", "lower right", ...)."""
        names = [""]
        for part in self.parts:
            names = [f"{name} {side}".strip() for name in names for side in PART_AXES[part][1]]
        return names

    def prompts(self, level: int) -> list[str]:
        """The node prompts of level 1 (regions) or 2 (parts: region-major)."""
        if level == 1:
            return list(self.region_prompts)
        return [f"{part} part of the {region}" for region in self.region_prompts for part in self.part_names]

    def prompt_groups(self, level: int) -> list[int]:
        """Per node of `level`, the index of the first node with the same prompt text."""
        prompts = self.prompts(level)
        return [prompts.index(p) for p in prompts]

    def nodes(self) -> list[dict]:
        """The whole tree: {"id", "level", "parent", "prompt"}, body first."""
        tree = [{"id": 0, "level": 0, "parent": None, "prompt": "body"}]
        for k, prompt in enumerate(self.prompts(1)):
            tree.append({"id": 1 + k, "level": 1, "parent": 0, "prompt": prompt})
        per = len(self.part_names)
        for j, prompt in enumerate(self.prompts(2) if self.parts else []):
            tree.append({"id": 1 + self.regions + j, "level": 2, "parent": 1 + j // per, "prompt": prompt})
        return tree

    # ------------------------------------------------------------------ assignment

    def assign(self, features: np.ndarray, coords: np.ndarray, body: np.ndarray) -> list[np.ndarray]:
        """Node ids per level: [level 1 (d, h, w), level 2 (d, h, w)] long, -1 outside the body (level 2
        only when parts are configured). features (F, d, h, w), coords (3, d, h, w), body (d, h, w)."""
        shape = body.shape
        index = np.flatnonzero(body)
        f = features.reshape(features.shape[0], -1)[:, index].T
        c = coords.reshape(3, -1)[:, index].T
        points = torch.from_numpy(self._scaled(f, c))
        region = torch.cdist(points, torch.from_numpy(self.centroids.astype(np.float32))).argmin(dim=1).numpy()
        levels = [np.full(int(np.prod(shape)), -1, np.int64)]
        levels[0][index] = region
        if self.parts:
            part = np.zeros(len(index), np.int64)
            for j, name in enumerate(self.parts):
                part = part * 2 + (c[:, PART_AXES[name][0]] > self.medians[region, j])
            level2 = np.full(int(np.prod(shape)), -1, np.int64)
            level2[index] = region * len(self.part_names) + part
            levels.append(level2)
        return [level.reshape(shape) for level in levels]

    # ------------------------------------------------------------------ storage and scoring

    def to_dict(self) -> dict:
        """Plain lists and numbers (a checkpoint is read with weights_only=True)."""
        return {"centroids": self.centroids.tolist(), "feature_mean": self.feature_mean.tolist(),
                "feature_std": self.feature_std.tolist(), "coord_mean": self.coord_mean.tolist(),
                "coord_std": self.coord_std.tolist(), "coord_weight": self.coord_weight, "parts": list(self.parts),
                "medians": self.medians.tolist(), "region_prompts": list(self.region_prompts)}

    @classmethod
    def from_dict(cls, data: dict) -> AnatomyGraph:
        arrays = {k: np.asarray(data[k], dtype=np.float64) for k in ("centroids", "feature_mean", "feature_std",
                                                                      "coord_mean", "coord_std", "medians")}
        return cls(arrays["centroids"], arrays["feature_mean"], arrays["feature_std"], arrays["coord_mean"],
                   arrays["coord_std"], float(data["coord_weight"]), list(data["parts"]),
                   arrays["medians"].reshape(len(arrays["centroids"]), len(data["parts"])),
                   list(data["region_prompts"]))


def best_region_dice(nodes: np.ndarray, labels: np.ndarray, organs: dict[int, str]) -> dict[str, float]:
    """For each organ label present, the Dice of the best-matching node region. nodes, labels (d, h, w)."""
    scores = {}
    for value, name in organs.items():
        organ = labels == value
        if value == 0 or not organ.any():
            continue
        best = 0.0
        for node in np.unique(nodes[nodes >= 0]):
            region = nodes == node
            best = max(best, 2.0 * float((region & organ).sum()) / float(region.sum() + organ.sum()))
        scores[name] = best
    return scores
