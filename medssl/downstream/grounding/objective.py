"""The grounding training objective for the shared Trainer: one model call embeds the batch's volumes
and all its texts; every active alignment objective reads the resulting `AlignmentStep`."""

from __future__ import annotations

import torch
from torch import nn

from medssl.downstream.grounding.config import GROUNDING_OBJECTIVES, GroundingConfig
from medssl.downstream.grounding.graph import AnatomyGraph
from medssl.losses.alignment import AlignmentStep
from medssl.losses.report_global import volume_embeddings
from medssl.losses.weighting import weighted_total
from medssl.training.loop import StepOutput


class GroundingObjective:
    """objective(model, batch, generator) -> StepOutput (medssl.training.loop)."""

    def __init__(self, config: GroundingConfig, graph: AnatomyGraph | None):
        self.section = config.objectives
        self.objectives = {name: GROUNDING_OBJECTIVES[name](getattr(self.section, name))
                           for name in self.section.active()}
        levels = (1, 2) if graph is not None and graph.parts else (1,) if graph is not None else ()
        self.prompts = [graph.prompts(level) for level in levels]
        self.groups = [torch.tensor(graph.prompt_groups(level)) for level in levels]

    def __call__(self, model: nn.Module, batch: dict, generator: torch.Generator) -> StepOutput:
        texts = batch["phrases"] + batch["reports"] + batch["negated"] + [p for level in self.prompts for p in level]
        inputs = batch["x"] if "x" in batch else {"features": batch["features"], "coords": batch["coords"]}
        voxels, embedded = model(inputs, texts)
        sizes = [len(batch["phrases"]), len(batch["reports"]), len(batch["negated"])] + [len(p) for p in self.prompts]
        phrases, reports, negated, *prompts = embedded.split(sizes)
        device = voxels.device
        step = AlignmentStep(voxels=voxels, body=batch["body"], positions=batch["positions"], phrases=phrases,
                             owner=batch["owner"], phrase_exclude=batch["phrase_exclude"], stated_mm=batch["stated_mm"],
                             reports=reports, report_exclude=batch["report_exclude"], negated=negated,
                             negated_owner=batch["negated_owner"], nodes=list(batch["nodes"]), node_prompts=prompts,
                             prompt_groups=[g.to(device) for g in self.groups])
        terms: dict[str, torch.Tensor] = {}
        for objective in self.objectives.values():
            terms.update(objective(step))
        loss = weighted_total(terms, self.section, GROUNDING_OBJECTIVES)
        embeddings = volume_embeddings(step.flat_voxels, step.flat_body).detach()
        return StepOutput(loss=loss, terms=terms, items=int(voxels.shape[0]), embeddings=embeddings)
