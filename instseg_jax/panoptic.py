"""Panoptic segmentation on the host: Panoptic FPN's combination of instance and semantic outputs
into one panoptic map, and panoptic quality (Kirillov et al. 2019) with panopticapi's rules.

A panoptic map is int32[H, W] of segment ids (0: void, no segment) with a list of segments
{"id", "category_id", "isthing"[, "score", "iscrowd", "area"]}.

PQ per category = sum of matched IoUs / (TP + FP/2 + FN/2), SQ = sum of IoUs / TP, RQ = TP /
(TP + FP/2 + FN/2), averaged over the categories that have any TP, FP or FN (all, things,
stuff). As panopticapi's pq_compute: a prediction and a ground-truth segment of one category
match when IoU > 0.5, with the prediction's pixels on ground-truth void left out of the union; crowd
ground truth matches nothing and is no false negative; an unmatched prediction is no false
positive when more than half of it lies on void or on crowd ground truth of its category.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from instseg_jax.structures import ImageGeometry

VOID = 0


def combine(
    instance_masks: np.ndarray,
    scores: np.ndarray,
    classes: np.ndarray,
    semantic: np.ndarray,
    thing_category_ids,
    stuff_category_ids,
    overlap_threshold: float = 0.5,
    score_threshold: float = 0.5,
    stuff_area: float = 4096,
) -> tuple[np.ndarray, list[dict]]:
    """detectron2's combine_semantic_and_instance_outputs: (panoptic ids int32[H, W], segments).

    instance_masks bool[K, H, W] with scores[K] and class indices classes[K] (into
    thing_category_ids); semantic int[H, W]: 0 for "things", s >= 1 for stuff class s - 1
    (into stuff_category_ids). Instances by descending score, those of score >= score_threshold,
    each taking its pixels not taken yet unless more than overlap_threshold of its mask is
    taken already; then each stuff class takes its untaken pixels when at least stuff_area of
    them remain (the caller scales the area to its resolution).
    """
    height, width = semantic.shape
    panoptic = np.zeros((height, width), np.int32)
    segments = []
    for k in np.argsort(-np.asarray(scores), kind="stable"):
        if scores[k] < score_threshold:
            break
        mask = np.asarray(instance_masks[k], bool)
        area = int(mask.sum())
        if area == 0:
            continue
        taken = mask & (panoptic > 0)
        if taken.sum() / area > overlap_threshold:
            continue
        mask &= panoptic == 0
        segment_id = len(segments) + 1
        panoptic[mask] = segment_id
        segments.append(
            {
                "id": segment_id,
                "category_id": int(thing_category_ids[int(classes[k])]),
                "isthing": True,
                "score": float(scores[k]),
                "instance_index": int(k),
            }
        )
    for stuff in range(1, len(stuff_category_ids) + 1):
        mask = (semantic == stuff) & (panoptic == 0)
        if mask.sum() < stuff_area:
            continue
        segment_id = len(segments) + 1
        panoptic[mask] = segment_id
        segments.append(
            {
                "id": segment_id,
                "category_id": int(stuff_category_ids[stuff - 1]),
                "isthing": False,
            }
        )
    return panoptic, segments


@dataclasses.dataclass
class _Category:
    iou: float = 0.0
    tp: int = 0
    fp: int = 0
    fn: int = 0


class PanopticQuality:
    """Accumulates panoptic quality over images (`add`), then `summary`."""

    def __init__(self, categories: dict[int, bool]):
        """categories: {category id: isthing}."""
        self.categories = dict(categories)
        self.stats = {c: _Category() for c in self.categories}

    def add(self, gt: np.ndarray, gt_segments, pred: np.ndarray, pred_segments) -> None:
        """One image: ground-truth and predicted panoptic maps int[H, W] and their segments
        (ground truth: "iscrowd" optional, "area" taken from the map)."""
        gt, pred = np.asarray(gt, np.int64), np.asarray(pred, np.int64)
        if gt.shape != pred.shape:
            raise ValueError(f"panoptic maps differ in size: {gt.shape} and {pred.shape}")
        gt_info = {int(s["id"]): s for s in gt_segments}
        pred_info = {int(s["id"]): s for s in pred_segments}
        for segments, kind in ((gt_info, "ground-truth"), (pred_info, "predicted")):
            unknown = {s["category_id"] for s in segments.values()} - set(self.categories)
            if unknown:
                raise ValueError(f"{kind} segments of unknown categories {sorted(unknown)}")
        pred_ids, pred_counts = np.unique(pred, return_counts=True)
        pred_area = dict(zip(pred_ids.tolist(), pred_counts.tolist(), strict=True))
        missing = [i for i in pred_ids.tolist() if i != VOID and i not in pred_info]
        if missing:
            raise ValueError(f"predicted map has segment ids {missing} without segments")
        gt_ids, gt_counts = np.unique(gt, return_counts=True)
        gt_area = dict(zip(gt_ids.tolist(), gt_counts.tolist(), strict=True))
        offset = int(max(pred.max(initial=0), 0)) + 1
        pairs, counts = np.unique(gt * offset + pred, return_counts=True)
        overlap = {
            (int(p // offset), int(p % offset)): int(c)
            for p, c in zip(pairs.tolist(), counts.tolist(), strict=True)
        }
        gt_matched, pred_matched = set(), set()
        for (g, p), intersection in overlap.items():
            if g not in gt_info or p not in pred_info:
                continue
            if gt_info[g].get("iscrowd", 0):
                continue
            if gt_info[g]["category_id"] != pred_info[p]["category_id"]:
                continue
            union = (
                pred_area.get(p, 0) + gt_area.get(g, 0) - intersection - overlap.get((VOID, p), 0)
            )
            iou = intersection / union
            if iou > 0.5:
                stat = self.stats[gt_info[g]["category_id"]]
                stat.tp += 1
                stat.iou += iou
                gt_matched.add(g)
                pred_matched.add(p)
        crowd_of = {}
        for g, info in gt_info.items():
            if g in gt_matched:
                continue
            if info.get("iscrowd", 0):
                crowd_of[info["category_id"]] = g
                continue
            if gt_area.get(g, 0) > 0:
                self.stats[info["category_id"]].fn += 1
        for p, info in pred_info.items():
            if p in pred_matched or pred_area.get(p, 0) == 0:
                continue
            ignored = overlap.get((VOID, p), 0)
            if info["category_id"] in crowd_of:
                ignored += overlap.get((crowd_of[info["category_id"]], p), 0)
            if ignored / pred_area[p] > 0.5:
                continue
            self.stats[info["category_id"]].fp += 1

    def summary(self) -> dict:
        """{"All" | "Things" | "Stuff": {"PQ", "SQ", "RQ", "n"}, "per_category": {id: ...}}."""
        out, per_category = {}, {}
        for name, wanted in (("All", None), ("Things", True), ("Stuff", False)):
            pq = sq = rq = 0.0
            n = 0
            for category, isthing in self.categories.items():
                if wanted is not None and isthing != wanted:
                    continue
                s = self.stats[category]
                denominator = s.tp + 0.5 * s.fp + 0.5 * s.fn
                if denominator == 0:
                    continue
                n += 1
                values = {
                    "PQ": s.iou / denominator,
                    "SQ": s.iou / s.tp if s.tp else 0.0,
                    "RQ": s.tp / denominator,
                }
                per_category[category] = values
                pq, sq, rq = pq + values["PQ"], sq + values["SQ"], rq + values["RQ"]
            out[name] = {
                "PQ": pq / n if n else 0.0,
                "SQ": sq / n if n else 0.0,
                "RQ": rq / n if n else 0.0,
                "n": n,
            }
        out["per_category"] = per_category
        return out


def semantic_to_original(classes: np.ndarray, geometry: ImageGeometry) -> np.ndarray:
    """uint8[H, W] at the original image's pixels of a canvas class map classes[h, w] at stride
    canvas / h: each pixel centre mapped onto the canvas (resize, crop, flip) reads the cell
    it falls in (nearest)."""
    stride = geometry.canvas_hw[0] / classes.shape[0]
    y, x = geometry.pixel_centres_on_canvas()
    rows = np.clip(np.floor(y / stride).astype(np.int64), 0, classes.shape[0] - 1)
    cols = np.clip(np.floor(x / stride).astype(np.int64), 0, classes.shape[1] - 1)
    return np.asarray(classes)[rows[:, None], cols[None, :]]


def predicted_map(
    instances,
    semantic_classes: np.ndarray,
    geometry: ImageGeometry,
    category_ids,
    stuff_category_ids,
    cfg,
):
    """(int32[H, W] panoptic ids, segments) at the original pixels of one image: its instances
    (detections.image_instances, those of score >= cfg.combine_score) pasted as full masks,
    its stride-s semantic classes (Panoptic FPN's payload) read at every pixel, combined with
    cfg's thresholds. A thing segment's "instance_index" is its position in instances."""
    height, width = geometry.orig_hw
    masks = np.zeros((len(instances), height, width), bool)
    for mask, instance in zip(masks, instances, strict=True):
        region = instance["region"]
        if region is not None:
            top, left = instance["top"], instance["left"]
            mask[top : top + region.shape[0], left : left + region.shape[1]] = region
    return combine(
        masks,
        np.asarray([i["score"] for i in instances], np.float64),
        np.asarray([i["class"] for i in instances], np.int64),
        semantic_to_original(np.asarray(semantic_classes), geometry),
        category_ids,
        stuff_category_ids,
        cfg.combine_overlap,
        cfg.combine_score,
        cfg.combine_stuff_area,
    )


def report_of(summary: dict) -> dict:
    """eval_<step>.json's "panoptic" entry: PQ, SQ, RQ over all categories, then _th (things)
    and _st (stuff), in percent as panopticapi prints them, and the category counts."""
    out = {}
    for name, suffix in (("All", ""), ("Things", "_th"), ("Stuff", "_st")):
        for stat in ("PQ", "SQ", "RQ"):
            out[stat + suffix] = 100.0 * summary[name][stat]
        out["n" + suffix] = summary[name]["n"]
    return out
