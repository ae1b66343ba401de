"""Summarise a mutmut run (``make mutation``) as a per-module table in Markdown.

Reads ``python -m mutmut results --all true`` (one ``name: status`` line per mutant) and writes
the score of each mutated module: killed (+ timeouts) over the mutants that were tested. A
``no tests`` mutant is code no selected test reaches; it counts against the score. Surviving
mutants judged equivalent are listed in ``EQUIVALENT`` below with the reason, and reported
separately (the score over non-equivalent mutants is the one the issue asks for).

Usage: python benchmarks/mutation_report.py [--out benchmarks/results/mutation.md]
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Surviving mutants that cannot change any observable behaviour, with the reason. Keys are
# mutmut's mutant names; keep this list short and argued.
EQUIVALENT: dict[str, str] = {
    "rnb_kernels.tracking.tracker.xǁDomainGradientTrackerǁ_begin__mutmut_12": (
        "the tensor-parallel factor applied to every slot: a slot that is not row-sharded has tp_size 1, so w is the same"
    ),
    "rnb_kernels.tracking.tracker.xǁDomainGradientTrackerǁ_begin__mutmut_21": (
        "_synced = None instead of False: it is only read as a condition, and None is falsy"
    ),
    "rnb_kernels.tracking.tracker.xǁDomainGradientTrackerǁ_begin__mutmut_4": (
        "world_size() >= 1 instead of > 1: with one rank, _dp() gives size 1, so the division is by 1"
    ),
    "rnb_kernels.tracking.tracker.xǁDomainGradientTrackerǁ_release__mutmut_10": (
        "grads_before = None instead of []: it is read only by _release, once per block, and the ended context never reads it again (clearing it only drops references)"
    ),
    "rnb_kernels.tracking.tracker.xǁDomainGradientTrackerǁgram__mutmut_6": (
        "device=None / no device / .to(None) keeps CPU tensors on the CPU, the tracker's device in every CPU test; only a CUDA model can tell"
    ),
    "rnb_kernels.tracking.tracker.xǁDomainGradientTrackerǁgram__mutmut_10": (
        "device=None / no device / .to(None) keeps CPU tensors on the CPU, the tracker's device in every CPU test; only a CUDA model can tell"
    ),
    "rnb_kernels.tracking.tracker.xǁDomainGradientTrackerǁgram__mutmut_15": (
        "device=None / no device / .to(None) keeps CPU tensors on the CPU, the tracker's device in every CPU test; only a CUDA model can tell"
    ),
    "rnb_kernels.tracking.tracker.xǁDomainGradientTrackerǁgram__mutmut_19": (
        "device=None / no device / .to(None) keeps CPU tensors on the CPU, the tracker's device in every CPU test; only a CUDA model can tell"
    ),
    "rnb_kernels.tracking.tracker.xǁDomainGradientTrackerǁgram__mutmut_30": (
        "device=None / no device / .to(None) keeps CPU tensors on the CPU, the tracker's device in every CPU test; only a CUDA model can tell"
    ),
    "rnb_kernels.tracking.tracker.xǁDomainGradientTrackerǁgram_vector__mutmut_13": (
        "device=None / no device / .to(None) keeps CPU tensors on the CPU, the tracker's device in every CPU test; only a CUDA model can tell"
    ),
    "rnb_kernels.tracking.tracker.xǁDomainGradientTrackerǁgram_vector__mutmut_16": (
        "device=None / no device / .to(None) keeps CPU tensors on the CPU, the tracker's device in every CPU test; only a CUDA model can tell"
    ),
    "rnb_kernels.tracking.tracker.xǁDomainGradientTrackerǁgram_vector__mutmut_19": (
        "device=None / no device / .to(None) keeps CPU tensors on the CPU, the tracker's device in every CPU test; only a CUDA model can tell"
    ),
    "rnb_kernels.tracking.tracker.xǁDomainGradientTrackerǁgram_vector__mutmut_23": (
        "device=None / no device / .to(None) keeps CPU tensors on the CPU, the tracker's device in every CPU test; only a CUDA model can tell"
    ),
    "rnb_kernels.tracking.tracker.xǁDomainGradientTrackerǁgram_vector__mutmut_26": (
        "device=None / no device / .to(None) keeps CPU tensors on the CPU, the tracker's device in every CPU test; only a CUDA model can tell"
    ),
    "rnb_kernels.tracking.tracker.xǁDomainGradientTrackerǁgram_vector__mutmut_36": (
        "device=None / no device / .to(None) keeps CPU tensors on the CPU, the tracker's device in every CPU test; only a CUDA model can tell"
    ),
    "rnb_kernels.tracking.tracker.xǁDomainGradientTrackerǁdomain_grads__mutmut_12": (
        "device=None / no device / .to(None) keeps CPU tensors on the CPU, the tracker's device in every CPU test; only a CUDA model can tell"
    ),
    "rnb_kernels.tracking.tracker.xǁDomainGradientTrackerǁdomain_sketches__mutmut_11": (
        "device=None / no device / .to(None) keeps CPU tensors on the CPU, the tracker's device in every CPU test; only a CUDA model can tell"
    ),
    "rnb_kernels.tracking.tracker.xǁDomainGradientTrackerǁdomain_projections__mutmut_9": (
        "device=None / no device / .to(None) keeps CPU tensors on the CPU, the tracker's device in every CPU test; only a CUDA model can tell"
    ),
    "rnb_kernels.tracking.tracker.xǁDomainGradientTrackerǁtarget_grad__mutmut_11": (
        "device=None / no device / .to(None) keeps CPU tensors on the CPU, the tracker's device in every CPU test; only a CUDA model can tell"
    ),
    "rnb_kernels.tracking.tracker.xǁDomainGradientTrackerǁtarget_alignment__mutmut_4": (
        "device=None / no device / .to(None) keeps CPU tensors on the CPU, the tracker's device in every CPU test; only a CUDA model can tell"
    ),
    "rnb_kernels.tracking.tracker.xǁDomainGradientTrackerǁtarget_alignment__mutmut_7": (
        "device=None / no device / .to(None) keeps CPU tensors on the CPU, the tracker's device in every CPU test; only a CUDA model can tell"
    ),
    "rnb_kernels.tracking.tracker.xǁDomainGradientTrackerǁtarget_alignment__mutmut_16": (
        "device=None / no device / .to(None) keeps CPU tensors on the CPU, the tracker's device in every CPU test; only a CUDA model can tell"
    ),
    "rnb_kernels.tracking.tracker.xǁDomainGradientTrackerǁtarget_alignment__mutmut_19": (
        "device=None / no device / .to(None) keeps CPU tensors on the CPU, the tracker's device in every CPU test; only a CUDA model can tell"
    ),
    "rnb_kernels.tracking.tracker.xǁDomainGradientTrackerǁtarget_alignment__mutmut_35": (
        "device=None / no device / .to(None) keeps CPU tensors on the CPU, the tracker's device in every CPU test; only a CUDA model can tell"
    ),
    "rnb_kernels.tracking.tracker.xǁDomainGradientTrackerǁload_state_dict__mutmut_156": (
        "device=None / no device / .to(None) keeps CPU tensors on the CPU, the tracker's device in every CPU test; only a CUDA model can tell"
    ),
    "rnb_kernels.tracking.tracker.xǁDomainGradientTrackerǁgram__mutmut_26": (
        "gram() without backend= resolves 'auto', which is the torch backend on CPU tensors, the tracker's resolved backend in every CPU test"
    ),
    "rnb_kernels.tracking.tracker.xǁDomainGradientTrackerǁtarget_alignment__mutmut_31": (
        "gram() without backend= resolves 'auto', which is the torch backend on CPU tensors, the tracker's resolved backend in every CPU test"
    ),
    "rnb_kernels.tracking.tracker.xǁDomainGradientTrackerǁ_target_ctx__mutmut_6": (
        "validate_domain_ids ignores num_domains with mask=True: a bool mask is not range-checked"
    ),
    "rnb_kernels.tracking.tracker.xǁDomainGradientTrackerǁ_target_ctx__mutmut_13": (
        "validate_domain_ids ignores num_domains with mask=True: a bool mask is not range-checked"
    ),
    "rnb_kernels.tracking.tracker.xǁDomainGradientTrackerǁ_target_ctx__mutmut_28": (
        "a mask's ids are only 0 and -1: per_sample_counts(ids, 2)[0] and per_sample_counts(ids, 1)[0] both count domain 0"
    ),
    "rnb_kernels.tracking.tracker.xǁDomainGradientTrackerǁrecord_target__mutmut_19": (
        "loss.sum() of a 0-d loss is the same scalar"
    ),
    "rnb_kernels.tracking.tracker.xǁDomainGradientTrackerǁ_checked__mutmut_13": (
        "the warning's stacklevel: mutmut's trampoline adds stack frames, so the test that checks it (test_finite_reads_are_silent_and_warnings_point_at_the_caller) skips that assertion under mutmut; outside it, both mutants planted by hand fail it"
    ),
    "rnb_kernels.tracking.tracker.xǁDomainGradientTrackerǁ_checked__mutmut_14": (
        "the warning's stacklevel: mutmut's trampoline adds stack frames, so the test that checks it (test_finite_reads_are_silent_and_warnings_point_at_the_caller) skips that assertion under mutmut; outside it, both mutants planted by hand fail it"
    ),
    "rnb_kernels.tracking.tracker.xǁDomainGradientTrackerǁfused_cross_entropy__mutmut_19": (
        "module=None: fused_linear_cross_entropy then finds the slot by the weight it is given, this slot's module's weight; only two tracked layers sharing one weight tensor could tell"
    ),
    "rnb_kernels.tracking.tracker.xǁDomainGradientTrackerǁfused_cross_entropy__mutmut_25": (
        "module=None: fused_linear_cross_entropy then finds the slot by the weight it is given, this slot's module's weight; only two tracked layers sharing one weight tensor could tell"
    ),
    "rnb_kernels.tracking.tracker.xǁDomainGradientTrackerǁremove__mutmut_3": (
        "SLOTS.pop without a default: the key was registered at construction and is popped once (remove() returns early once removed), so it is always there"
    ),
    "rnb_kernels.tracking.tracker.xǁDomainGradientTrackerǁremove__mutmut_12": (
        "getattr default None instead of False: both are falsy under `not`"
    ),
    "rnb_kernels.tracking.tracker.xǁDomainGradientTrackerǁsync__mutmut_1": (
        "`or` -> `and` before world_size() == 1: uninitialised, world_size() is 1 and both return; initialised with one rank, the mutant takes the sum path with dp size 1: no collective, buffers brought to scale 1 (exact for power-of-two loss scales), the same statistics"
    ),
    "rnb_kernels.mixing.rnb.xǁRnBǁload_state_dict__mutmut_4": (
        "the argument name of an as_float64 call whose input _load_extra_state already validated: the message cannot be produced"
    ),
    "rnb_kernels.mixing.rnb.xǁRnBǁload_state_dict__mutmut_9": (
        "the argument name of an as_float64 call whose input _load_extra_state already validated: the message cannot be produced"
    ),
    "rnb_kernels.mixing.rnb.xǁRnBǁload_state_dict__mutmut_10": (
        "the argument name of an as_float64 call whose input _load_extra_state already validated: the message cannot be produced"
    ),
    "rnb_kernels.mixing.odm.xǁODMǁload_state_dict__mutmut_4": (
        "the argument name of an as_float64 call whose input _load_extra_state already validated: the message cannot be produced"
    ),
    "rnb_kernels.mixing.odm.xǁODMǁload_state_dict__mutmut_9": (
        "the argument name of an as_float64 call whose input _load_extra_state already validated: the message cannot be produced"
    ),
    "rnb_kernels.mixing.odm.xǁODMǁload_state_dict__mutmut_10": (
        "the argument name of an as_float64 call whose input _load_extra_state already validated: the message cannot be produced"
    ),
    "rnb_kernels.mixing.dga.xǁDGADistributionǁload_state_dict__mutmut_4": (
        "the argument name of an as_float64 call whose input _load_extra_state already validated: the message cannot be produced"
    ),
    "rnb_kernels.mixing.dga.xǁDGADistributionǁload_state_dict__mutmut_9": (
        "the argument name of an as_float64 call whose input _load_extra_state already validated: the message cannot be produced"
    ),
    "rnb_kernels.mixing.dga.xǁDGADistributionǁload_state_dict__mutmut_10": (
        "the argument name of an as_float64 call whose input _load_extra_state already validated: the message cannot be produced"
    ),
    "rnb_kernels.mixing.odm.xǁODMǁ_eps__mutmut_2": (
        "ODM._eps is never called with t = 0 (update passes t >= 1), and with K = 1 the single weight is 1 whatever ε is"
    ),
    "rnb_kernels.mixing.odm.xǁODMǁ_eps__mutmut_4": (
        "eps(1) = min(1/K, sqrt(ln K / K)) = 1/K for every K >= 2, so the t == 1 shortcut returns the same value"
    ),
    "rnb_kernels.mixing.odm.xǁODMǁ_eps__mutmut_7": (
        "ODM._eps is never called with t = 0 (update passes t >= 1), and with K = 1 the single weight is 1 whatever ε is"
    ),
    "rnb_kernels.mixing.odm.xǁODMǁ_eps__mutmut_8": (
        "ODM._eps is never called with t = 0 (update passes t >= 1), and with K = 1 the single weight is 1 whatever ε is"
    ),
    "rnb_kernels.mixing.odm.xǁODMǁ_eps__mutmut_9": (
        "ODM._eps is never called with t = 0 (update passes t >= 1), and with K = 1 the single weight is 1 whatever ε is"
    ),
    "rnb_kernels.mixing.odm.xǁODMǁ_eps__mutmut_10": (
        "ODM._eps is never called with t = 0 (update passes t >= 1), and with K = 1 the single weight is 1 whatever ε is"
    ),
    "rnb_kernels.mixing.odm.xǁODMǁ_eps__mutmut_11": (
        "ODM._eps is never called with t = 0 (update passes t >= 1), and with K = 1 the single weight is 1 whatever ε is"
    ),
    "rnb_kernels.mixing.odm.xǁODMǁ_eps__mutmut_12": (
        "ODM._eps is never called with t = 0 (update passes t >= 1), and with K = 1 the single weight is 1 whatever ε is"
    ),
    "rnb_kernels.mixing.odm.xǁODMǁ_eps__mutmut_13": (
        "ODM._eps is never called with t = 0 (update passes t >= 1), and with K = 1 the single weight is 1 whatever ε is"
    ),
    "rnb_kernels.ops.reference.x_gram_ref__mutmut_18": (
        "computing the lower triangle too writes the same dot products (torch.dot is symmetric in its arguments)"
    ),
    "rnb_kernels.ops.reference.x_gram_ref__mutmut_10": (
        "device=None allocates on the CPU, which is a.device in every CPU test; only the GPU tests (cuda marker) can tell"
    ),
    "rnb_kernels.ops.reference.x_gram_ref__mutmut_14": (
        "device=None allocates on the CPU, which is a.device in every CPU test; only the GPU tests (cuda marker) can tell"
    ),
    "rnb_kernels.ops.reference.x_gram_ref__mutmut_40": (
        "device=None allocates on the CPU, which is a.device in every CPU test; only the GPU tests (cuda marker) can tell"
    ),
    "rnb_kernels.ops.reference.x_gram_ref__mutmut_43": (
        "device=None allocates on the CPU, which is a.device in every CPU test; only the GPU tests (cuda marker) can tell"
    ),
    "rnb_kernels.ops.reference.x_gram_ref__mutmut_49": (
        "device=None allocates on the CPU, which is a.device in every CPU test; only the GPU tests (cuda marker) can tell"
    ),
    "rnb_kernels.ops.reference.x_gram_ref__mutmut_53": (
        "device=None allocates on the CPU, which is a.device in every CPU test; only the GPU tests (cuda marker) can tell"
    ),
    "rnb_kernels.ops.sketch_hash.x_sketch_hash__mutmut_7": (
        "torch.arange / torch.tensor of Python ints already default to int64"
    ),
    "rnb_kernels.ops.sketch_hash.x_sketch_hash__mutmut_11": (
        "torch.arange / torch.tensor of Python ints already default to int64"
    ),
    "rnb_kernels.ops.sketch_hash.x_sketch_hash__mutmut_16": (
        "torch.arange / torch.tensor of Python ints already default to int64"
    ),
    "rnb_kernels.ops.sketch_hash.x_sketch_hash__mutmut_19": (
        "torch.arange / torch.tensor of Python ints already default to int64"
    ),
    "rnb_kernels.ops.sketch_hash.x_bias_hash__mutmut_7": (
        "torch.arange / torch.tensor of Python ints already default to int64"
    ),
    "rnb_kernels.ops.sketch_hash.x_bias_hash__mutmut_11": (
        "torch.arange / torch.tensor of Python ints already default to int64"
    ),
    "rnb_kernels.ops.sketch_hash.x_bias_hash__mutmut_16": (
        "torch.arange / torch.tensor of Python ints already default to int64"
    ),
    "rnb_kernels.ops.sketch_hash.x_bias_hash__mutmut_19": (
        "torch.arange / torch.tensor of Python ints already default to int64"
    ),
    "rnb_kernels.ops.sketch_hash.x_projection_hash__mutmut_7": (
        "torch.arange / torch.tensor of Python ints already default to int64"
    ),
    "rnb_kernels.ops.sketch_hash.x_projection_hash__mutmut_11": (
        "torch.arange / torch.tensor of Python ints already default to int64"
    ),
    "rnb_kernels.mixing.base.xǁMixerǁload_state_dict__mutmut_25": (
        "drops the shape check of as_float64(state['weights']); the as_simplex call right after checks the same shape with the same message"
    ),
    "rnb_kernels.mixing.base.xǁMixerǁload_state_dict__mutmut_28": (
        "drops the shape check of as_float64(state['weights']); the as_simplex call right after checks the same shape with the same message"
    ),
    "rnb_kernels.mixing.base.xǁMixerǁload_state_dict__mutmut_35": (
        "drops the shape check of as_simplex(w); w is the output of as_float64 with that shape already checked"
    ),
    "rnb_kernels.mixing.base.xǁMixerǁload_state_dict__mutmut_38": (
        "drops the shape check of as_simplex(w); w is the output of as_float64 with that shape already checked"
    ),
    "rnb_kernels.mixing.static.xǁStaticǁimportance__mutmut_13": (
        "np.asarray of a CPU tensor equals np.asarray of its .cpu(); only a CUDA tensor can tell"
    ),
    "rnb_kernels.mixing.static.xǁStaticǁimportance__mutmut_16": (
        "`kind not in 'XXiuXX'`: no numpy dtype kind is 'X', so the same kinds pass"
    ),
    "rnb_kernels.mixing.static.xǁStaticǁimportance__mutmut_31": (
        "ndarray.astype(None) is astype(float64), and as_simplex converts to float64 anyway"
    ),
    "rnb_kernels.mixing.registry.x_register_mixer__mutmut_15": (
        "the getattr default is never used: c passed the Mixer-subclass check and Mixer defines `name`"
    ),
    "rnb_kernels.mixing.registry.x_register_mixer__mutmut_18": (
        "the getattr default is never used: c passed the Mixer-subclass check and Mixer defines `name`"
    ),
    "rnb_kernels.mixing.registry.x_register_mixer__mutmut_21": (
        "the getattr default is never used: c passed the Mixer-subclass check and Mixer defines `name`"
    ),
    "rnb_kernels.mixing.base.x_as_float64__mutmut_21": (
        "device=None / no device in .to() keeps the tensor's device, the CPU in every CPU test; only a CUDA tensor can tell"
    ),
    "rnb_kernels.mixing.base.x_as_float64__mutmut_23": (
        "device=None / no device in .to() keeps the tensor's device, the CPU in every CPU test; only a CUDA tensor can tell"
    ),
    "rnb_kernels.tracking.ids.x_validate_domain_ids__mutmut_15": (
        "torch.where(bool, 0, -1) of Python ints is already int64, so .to(None) changes nothing"
    ),
    "rnb_kernels.tracking.ids.x_per_sample_counts__mutmut_8": (
        "device=None allocates on the CPU, which is ids.device in every CPU test; only a CUDA tensor can tell"
    ),
    "rnb_kernels.tracking.ids.x_per_sample_counts__mutmut_12": (
        "device=None allocates on the CPU, which is ids.device in every CPU test; only a CUDA tensor can tell"
    ),
    "rnb_kernels.sampling.x__largest_remainder__mutmut_18": (
        "with rest == 0 the branch adds order[:0], nothing"
    ),
    "rnb_kernels.sampling.x__largest_remainder__mutmut_29": (
        "numpy parses the sort kind case-insensitively: 'STABLE' is 'stable'"
    ),
    "rnb_kernels.sampling.xǁMixtureSamplerǁstate_dict__mutmut_9": (
        "bit_generator.state returns a fresh dict on every read, so a shallow copy shares nothing with the generator"
    ),
    "rnb_kernels.sampling.xǁMixtureSamplerǁload_state_dict__mutmut_19": (
        "assigning bit_generator.state copies the values in; the generator keeps no reference to the dict"
    ),
    "rnb_kernels.sampling.xǁMixtureSamplerǁload_state_dict__mutmut_29": (
        "state['cursors'] is state_dict's int64 array (or a list of ints), which np.asarray keeps int64"
    ),
    "rnb_kernels.sampling.xǁMixtureSamplerǁload_state_dict__mutmut_31": (
        "state['cursors'] is state_dict's int64 array (or a list of ints), which np.asarray keeps int64"
    ),
    "rnb_kernels.sampling.xǁMixtureSamplerǁload_state_dict__mutmut_36": (
        "state['carry'] is state_dict's float64 array (or a list of floats), which np.asarray keeps float64"
    ),
    "rnb_kernels.sampling.xǁMixtureSamplerǁload_state_dict__mutmut_38": (
        "state['carry'] is state_dict's float64 array (or a list of floats), which np.asarray keeps float64"
    ),
    "rnb_kernels.sampling.xǁMixtureSamplerǁ__init____mutmut_7": (
        "np.asarray of a CPU tensor equals np.asarray of its .cpu(); only a CUDA tensor can tell"
    ),
    "rnb_kernels.sampling.xǁMixtureSamplerǁ__init____mutmut_10": (
        "`kind not in 'XXiuXX'`: no numpy dtype kind is 'X', so the same kinds pass"
    ),
    "rnb_kernels.sampling.xǁMixtureSamplerǁ__init____mutmut_137": (
        "np.array of Python ints is already int64 (on the 64-bit Linux the package targets)"
    ),
    "rnb_kernels.sampling.xǁMixtureSamplerǁ__init____mutmut_139": (
        "np.array of Python ints is already int64 (on the 64-bit Linux the package targets)"
    ),
    "rnb_kernels.sampling.xǁMixtureSamplerǁ__init____mutmut_151": ("np.zeros defaults to float64"),
    "rnb_kernels.sampling.xǁMixtureSamplerǁ__init____mutmut_153": ("np.zeros defaults to float64"),
    "rnb_kernels.sampling.xǁMixtureSamplerǁ__init____mutmut_161": (
        "_warned_empty is only read as `not self._warned_empty`, and None is falsy like False"
    ),
    "rnb_kernels.balancer.xǁBalancerǁ_record_loss__mutmut_12": (
        "device=None / no device keeps the loss on the CPU, which is the accumulators' device in every CPU test; only a CUDA model can tell"
    ),
    "rnb_kernels.balancer.xǁBalancerǁ_record_loss__mutmut_15": (
        "device=None / no device keeps the loss on the CPU, which is the accumulators' device in every CPU test; only a CUDA model can tell"
    ),
    "rnb_kernels.balancer.xǁBalancerǁ_record_loss__mutmut_21": (
        "device=None / no device keeps the loss on the CPU, which is the accumulators' device in every CPU test; only a CUDA model can tell"
    ),
    "rnb_kernels.balancer.xǁBalancerǁ_record_loss__mutmut_23": (
        "device=None / no device keeps the loss on the CPU, which is the accumulators' device in every CPU test; only a CUDA model can tell"
    ),
    "rnb_kernels.balancer.xǁBalancerǁ_record_loss__mutmut_31": (
        "device=None / no device keeps the loss on the CPU, which is the accumulators' device in every CPU test; only a CUDA model can tell"
    ),
    "rnb_kernels.balancer.xǁBalancerǁ_record_loss__mutmut_34": (
        "device=None / no device keeps the loss on the CPU, which is the accumulators' device in every CPU test; only a CUDA model can tell"
    ),
    "rnb_kernels.balancer.xǁBalancerǁloss_counts__mutmut_1": (
        "device=None / no device keeps the CPU accumulators on the CPU; only a CUDA model can tell"
    ),
    "rnb_kernels.balancer.xǁBalancerǁloss_counts__mutmut_3": (
        "device=None / no device keeps the CPU accumulators on the CPU; only a CUDA model can tell"
    ),
    "rnb_kernels.balancer.xǁBalancerǁdomain_losses__mutmut_15": ("float('NAN') is float('nan')"),
    "rnb_kernels.balancer.xǁBalancerǁ_log__mutmut_43": (
        "newline=None only translates '\\n' to os.linesep, which is '\\n' on the POSIX systems the package targets: the CSV bytes are the same"
    ),
    "rnb_kernels.balancer.xǁBalancerǁ_log__mutmut_46": (
        "newline=None only translates '\\n' to os.linesep, which is '\\n' on the POSIX systems the package targets: the CSV bytes are the same"
    ),
    "rnb_kernels.balancer.xǁBalancerǁ_log__mutmut_64": (
        "the CSV header is also guarded by f.tell() == 0, and the append-only file is never empty after the first write"
    ),
    "rnb_kernels.balancer.xǁBalancerǁ_log__mutmut_65": (
        "the CSV header is also guarded by f.tell() == 0, and the append-only file is never empty after the first write"
    ),
    "rnb_kernels.balancer.xǁBalancerǁ__init____mutmut_70": (
        "the accumulators' device: the tracker's and the model's are the CPU in every CPU test; only a CUDA model can tell"
    ),
    "rnb_kernels.balancer.xǁBalancerǁ__init____mutmut_71": (
        "the accumulators' device: the tracker's and the model's are the CPU in every CPU test; only a CUDA model can tell"
    ),
    "rnb_kernels.balancer.xǁBalancerǁ__init____mutmut_78": (
        "the accumulators' device: the tracker's and the model's are the CPU in every CPU test; only a CUDA model can tell"
    ),
    "rnb_kernels.balancer.xǁBalancerǁ__init____mutmut_81": (
        "the accumulators' device: the tracker's and the model's are the CPU in every CPU test; only a CUDA model can tell"
    ),
    "rnb_kernels.balancer.xǁBalancerǁ__init____mutmut_85": (
        "the accumulators' device: the tracker's and the model's are the CPU in every CPU test; only a CUDA model can tell"
    ),
    "rnb_kernels.balancer.xǁBalancerǁ__init____mutmut_88": (
        "the accumulators' device: the tracker's and the model's are the CPU in every CPU test; only a CUDA model can tell"
    ),
    "rnb_kernels.balancer.xǁBalancerǁ__init____mutmut_102": (
        "_csv_header_done is only read as `not self._csv_header_done`, and None is falsy like False"
    ),
    "rnb_kernels.mixing.dga.xǁDGADistributionǁdefault_bases__mutmut_3": (
        "np.asarray of a CPU tensor equals np.asarray of its .cpu(); only a CUDA tensor can tell"
    ),
    "rnb_kernels.tracking.linear.xǁContextǁrows__mutmut_8": (
        "where the ids are copied to: in every CPU test ids, rows and layer are on the CPU, where .to(device), .to(None), a missing device and non_blocking give the same tensor; only a CUDA layer can tell"
    ),
    "rnb_kernels.tracking.linear.xǁContextǁrows__mutmut_11": (
        "where the ids are copied to: in every CPU test ids, rows and layer are on the CPU, where .to(device), .to(None), a missing device and non_blocking give the same tensor; only a CUDA layer can tell"
    ),
    "rnb_kernels.tracking.linear.xǁContextǁrows__mutmut_20": (
        "where the ids are copied to: in every CPU test ids, rows and layer are on the CPU, where .to(device), .to(None), a missing device and non_blocking give the same tensor; only a CUDA layer can tell"
    ),
    "rnb_kernels.tracking.linear.xǁContextǁrows__mutmut_22": (
        "where the ids are copied to: in every CPU test ids, rows and layer are on the CPU, where .to(device), .to(None), a missing device and non_blocking give the same tensor; only a CUDA layer can tell"
    ),
    "rnb_kernels.tracking.linear.xǁContextǁrows__mutmut_23": (
        "where the ids are copied to: in every CPU test ids, rows and layer are on the CPU, where .to(device), .to(None), a missing device and non_blocking give the same tensor; only a CUDA layer can tell"
    ),
    "rnb_kernels.tracking.linear.xǁContextǁrows__mutmut_24": (
        "where the ids are copied to: in every CPU test ids, rows and layer are on the CPU, where .to(device), .to(None), a missing device and non_blocking give the same tensor; only a CUDA layer can tell"
    ),
    "rnb_kernels.tracking.linear.xǁContextǁrows__mutmut_32": (
        "where the ids are copied to: in every CPU test ids, rows and layer are on the CPU, where .to(device), .to(None), a missing device and non_blocking give the same tensor; only a CUDA layer can tell"
    ),
    "rnb_kernels.tracking.linear.xǁContextǁrows__mutmut_34": (
        "where the ids are copied to: in every CPU test ids, rows and layer are on the CPU, where .to(device), .to(None), a missing device and non_blocking give the same tensor; only a CUDA layer can tell"
    ),
    "rnb_kernels.tracking.linear.xǁContextǁrows__mutmut_35": (
        "where the ids are copied to: in every CPU test ids, rows and layer are on the CPU, where .to(device), .to(None), a missing device and non_blocking give the same tensor; only a CUDA layer can tell"
    ),
    "rnb_kernels.tracking.linear.xǁContextǁrows__mutmut_36": (
        "where the ids are copied to: in every CPU test ids, rows and layer are on the CPU, where .to(device), .to(None), a missing device and non_blocking give the same tensor; only a CUDA layer can tell"
    ),
    "rnb_kernels.tracking.linear.x_tracked_rows__mutmut_10": (
        "where the ids are copied to: in every CPU test ids, rows and layer are on the CPU, where .to(device), .to(None), a missing device and non_blocking give the same tensor; only a CUDA layer can tell"
    ),
    "rnb_kernels.tracking.linear.x__apply__mutmut_13": (
        "autocast switched back on around TrackedLinear whose inputs _apply already cast to the autocast dtype (or left in float64, which autocast never casts): F.linear sees the same dtypes, so the same op runs"
    ),
    "rnb_kernels.tracking.linear.x__apply__mutmut_14": (
        "autocast switched back on around TrackedLinear whose inputs _apply already cast to the autocast dtype (or left in float64, which autocast never casts): F.linear sees the same dtypes, so the same op runs"
    ),
    "rnb_kernels.tracking.linear.xǁTrackedLinearǁbackward__mutmut_4": (
        "the eager backward taking the compiled-graph branch: same gradients and statistics (test_compiled_backward_branch_matches_eager); under record_target() it computes weight and bias gradients nobody asked for, which autograd.grad(..., [anchor]) discards: cost only"
    ),
    "rnb_kernels.tracking.linear.xǁTrackedLinearǁbackward__mutmut_50": (
        "a gradient returned for an input that needs none (needs_input_grad False, or a bias that is None/frozen) is dropped by autograd: cost only"
    ),
    "rnb_kernels.tracking.linear.xǁTrackedLinearǁbackward__mutmut_60": (
        "a gradient returned for an input that needs none (needs_input_grad False, or a bias that is None/frozen) is dropped by autograd: cost only"
    ),
    "rnb_kernels.tracking.linear.xǁTrackedLinearǁbackward__mutmut_58": (
        "a gradient returned for an input that needs none (needs_input_grad False, or a bias that is None/frozen) is dropped by autograd: cost only"
    ),
    "rnb_kernels.tracking.linear.xǁContextǁ__init____mutmut_5": (
        "Context.seen is only read for its truth value and only ever set to True, and None is falsy like False"
    ),
    "rnb_kernels.tracking.linear.xǁContextǁ__init____mutmut_7": (
        "Context.bad is only read for its truth value and only ever set to True, and None is falsy like False"
    ),
    "rnb_kernels.tracking.linear.xǁContextǁ__init____mutmut_14": (
        "Context.model_ran is only read for its truth value and only ever set to True, and None is falsy like False"
    ),
    "rnb_kernels.tracking.linear.xǁContextǁ__init____mutmut_13": (
        "grads_before is assigned by the tracker on entry to every block, before anything reads it"
    ),
    "rnb_kernels.tracking.linear.x_canonical_name__mutmut_3": (
        "`changed = None` instead of False inside the loop: only read as the while condition, and None is falsy like False"
    ),
    "rnb_kernels.tracking.linear.xǁContextǁ__init____mutmut_4": (
        "anchor_only None instead of True for record_target(): its backward then takes the general path, which accumulates the same statistics and also computes weight and input gradients that autograd.grad(..., [anchor]) discards; the bypass check it no longer skips finds every tracked layer accumulated: cost only"
    ),
    "rnb_kernels.tracking.slot.xǁSlotǁ_allocate__mutmut_14": (
        "dtype=None or no dtype for an fp32 buffer: torch's default dtype is float32, the same buffer"
    ),
    "rnb_kernels.tracking.slot.xǁSlotǁ_allocate__mutmut_19": (
        "dtype=None or no dtype for an fp32 buffer: torch's default dtype is float32, the same buffer"
    ),
    "rnb_kernels.tracking.slot.xǁSlotǁ_allocate__mutmut_26": (
        "dtype=None or no dtype for an fp32 buffer: torch's default dtype is float32, the same buffer"
    ),
    "rnb_kernels.tracking.slot.xǁSlotǁ_allocate__mutmut_30": (
        "dtype=None or no dtype for an fp32 buffer: torch's default dtype is float32, the same buffer"
    ),
    "rnb_kernels.tracking.slot.xǁSlotǁ_allocate__mutmut_48": (
        "dtype=None or no dtype for an fp32 buffer: torch's default dtype is float32, the same buffer"
    ),
    "rnb_kernels.tracking.slot.xǁSlotǁ_allocate__mutmut_53": (
        "dtype=None or no dtype for an fp32 buffer: torch's default dtype is float32, the same buffer"
    ),
    "rnb_kernels.tracking.slot.xǁSlotǁ_allocate__mutmut_61": (
        "dtype=None or no dtype for an fp32 buffer: torch's default dtype is float32, the same buffer"
    ),
    "rnb_kernels.tracking.slot.xǁSlotǁ_allocate__mutmut_66": (
        "dtype=None or no dtype for an fp32 buffer: torch's default dtype is float32, the same buffer"
    ),
    "rnb_kernels.tracking.slot.xǁSlotǁ_allocate__mutmut_73": (
        "dtype=None or no dtype for an fp32 buffer: torch's default dtype is float32, the same buffer"
    ),
    "rnb_kernels.tracking.slot.xǁSlotǁ_allocate__mutmut_77": (
        "dtype=None or no dtype for an fp32 buffer: torch's default dtype is float32, the same buffer"
    ),
    "rnb_kernels.tracking.slot.xǁSlotǁ_allocate__mutmut_83": (
        "dtype=None or no dtype for an fp32 buffer: torch's default dtype is float32, the same buffer"
    ),
    "rnb_kernels.tracking.slot.xǁSlotǁ_allocate__mutmut_86": (
        "dtype=None or no dtype for an fp32 buffer: torch's default dtype is float32, the same buffer"
    ),
    "rnb_kernels.tracking.slot.xǁSlotǁ_allocate__mutmut_15": (
        "the buffer's or rows' device: None or no device is the CPU, the device of every CPU test; only a CUDA layer can tell"
    ),
    "rnb_kernels.tracking.slot.xǁSlotǁ_allocate__mutmut_20": (
        "the buffer's or rows' device: None or no device is the CPU, the device of every CPU test; only a CUDA layer can tell"
    ),
    "rnb_kernels.tracking.slot.xǁSlotǁ_allocate__mutmut_27": (
        "the buffer's or rows' device: None or no device is the CPU, the device of every CPU test; only a CUDA layer can tell"
    ),
    "rnb_kernels.tracking.slot.xǁSlotǁ_allocate__mutmut_31": (
        "the buffer's or rows' device: None or no device is the CPU, the device of every CPU test; only a CUDA layer can tell"
    ),
    "rnb_kernels.tracking.slot.xǁSlotǁ_allocate__mutmut_49": (
        "the buffer's or rows' device: None or no device is the CPU, the device of every CPU test; only a CUDA layer can tell"
    ),
    "rnb_kernels.tracking.slot.xǁSlotǁ_allocate__mutmut_54": (
        "the buffer's or rows' device: None or no device is the CPU, the device of every CPU test; only a CUDA layer can tell"
    ),
    "rnb_kernels.tracking.slot.xǁSlotǁ_allocate__mutmut_62": (
        "the buffer's or rows' device: None or no device is the CPU, the device of every CPU test; only a CUDA layer can tell"
    ),
    "rnb_kernels.tracking.slot.xǁSlotǁ_allocate__mutmut_67": (
        "the buffer's or rows' device: None or no device is the CPU, the device of every CPU test; only a CUDA layer can tell"
    ),
    "rnb_kernels.tracking.slot.xǁSlotǁ_allocate__mutmut_74": (
        "the buffer's or rows' device: None or no device is the CPU, the device of every CPU test; only a CUDA layer can tell"
    ),
    "rnb_kernels.tracking.slot.xǁSlotǁ_allocate__mutmut_78": (
        "the buffer's or rows' device: None or no device is the CPU, the device of every CPU test; only a CUDA layer can tell"
    ),
    "rnb_kernels.tracking.slot.xǁSlotǁ_allocate__mutmut_84": (
        "the buffer's or rows' device: None or no device is the CPU, the device of every CPU test; only a CUDA layer can tell"
    ),
    "rnb_kernels.tracking.slot.xǁSlotǁ_allocate__mutmut_87": (
        "the buffer's or rows' device: None or no device is the CPU, the device of every CPU test; only a CUDA layer can tell"
    ),
    "rnb_kernels.tracking.slot.xǁSlotǁensure_buffers__mutmut_3": (
        "the buffer's or rows' device: None or no device is the CPU, the device of every CPU test; only a CUDA layer can tell"
    ),
    "rnb_kernels.tracking.slot.xǁSlotǁensure_buffers__mutmut_5": (
        "the buffer's or rows' device: None or no device is the CPU, the device of every CPU test; only a CUDA layer can tell"
    ),
    "rnb_kernels.tracking.slot.xǁSlotǁrows__mutmut_14": (
        "torch.cat of a single part equals that part"
    ),
    "rnb_kernels.tracking.slot.xǁSlotǁrows__mutmut_20": (
        "torch.cat of a single part equals that part"
    ),
    "rnb_kernels.tracking.slot.xǁSlotǁrows__mutmut_24": ("out / 1.0 is out exactly"),
    "rnb_kernels.tracking.linear.x_is_tracked__mutmut_3": (
        "is_tracked() is only used as a condition, and None is falsy like False"
    ),
    "rnb_kernels.ops.reference.x_count_sketch_ref__mutmut_14": (
        "device=None / no device / .to(None) keeps CPU tensors on the CPU, the inputs' device in every CPU test; only a CUDA model can tell"
    ),
    "rnb_kernels.ops.reference.x_count_sketch_ref__mutmut_20": (
        "device=None / no device / .to(None) keeps CPU tensors on the CPU, the inputs' device in every CPU test; only a CUDA model can tell"
    ),
    "rnb_kernels.ops.reference.x_count_sketch_ref__mutmut_34": (
        "device=None / no device / .to(None) keeps CPU tensors on the CPU, the inputs' device in every CPU test; only a CUDA model can tell"
    ),
    "rnb_kernels.ops.reference.x_count_sketch_ref__mutmut_38": (
        "device=None / no device / .to(None) keeps CPU tensors on the CPU, the inputs' device in every CPU test; only a CUDA model can tell"
    ),
    "rnb_kernels.ops.reference.x_segmented_wgrad_ref__mutmut_9": (
        "device=None / no device / .to(None) keeps CPU tensors on the CPU, the inputs' device in every CPU test; only a CUDA model can tell"
    ),
    "rnb_kernels.ops.reference.x_segmented_wgrad_ref__mutmut_14": (
        "device=None / no device / .to(None) keeps CPU tensors on the CPU, the inputs' device in every CPU test; only a CUDA model can tell"
    ),
    "rnb_kernels.ops.reference.x_bias_grads_ref__mutmut_5": (
        "device=None / no device / .to(None) keeps CPU tensors on the CPU, the inputs' device in every CPU test; only a CUDA model can tell"
    ),
    "rnb_kernels.ops.reference.x_bias_grads_ref__mutmut_9": (
        "device=None / no device / .to(None) keeps CPU tensors on the CPU, the inputs' device in every CPU test; only a CUDA model can tell"
    ),
    "rnb_kernels.ops.reference.x_count_sketch_ref__mutmut_28": (
        "g / sign instead of g * sign: sign is exactly +1 or -1, so both are exact and equal"
    ),
    "rnb_kernels.ops.reference.x_count_sketch_ref__mutmut_29": (
        "g.to(None) keeps g's dtype, and g * sign is promoted to float64 by the float64 sign exactly as g.to(float64) * sign"
    ),
    "rnb_kernels.mixing.dga.xǁDGAǁ_step__mutmut_19": (
        "warn=None instead of False: _skip reads warn as a truth value, and None is falsy"
    ),
    "rnb_kernels.mixing.dga.xǁDGAǁupdate__mutmut_16": (
        "warn=None instead of False: _skip reads warn as a truth value, and None is falsy"
    ),
    "rnb_kernels.mixing.dga.xǁDGADistributionǁupdate__mutmut_28": (
        "warn=None instead of False: _skip reads warn as a truth value, and None is falsy"
    ),
    "rnb_kernels.mixing.odm.xǁODMǁupdate__mutmut_26": (
        "warn=None instead of False: _skip reads warn as a truth value, and None is falsy"
    ),
    "rnb_kernels.mixing.rnb.xǁRnBǁupdate__mutmut_71": (
        "warn=None instead of False: _skip reads warn as a truth value, and None is falsy"
    ),
    "rnb_kernels.mixing.dga.xǁDGAǁ_step__mutmut_46": (
        "new * new.sum() instead of new / new.sum(): new is a convex combination of two simplex points (sum 1 up to rounding), so the division is a rounding guard and both give the same weights to ~1e-16"
    ),
    "rnb_kernels.mixing.odm.xǁODMǁupdate__mutmut_78": (
        "new * new.sum() instead of new / new.sum(): new is (1 - K eps) softmax + eps (sum 1 up to rounding), so the division is a rounding guard and both give the same weights to ~1e-16"
    ),
    "rnb_kernels.mixing.dga.xǁDGAǁ_load_extra_state__mutmut_53": (
        "the validator's default for a missing scale, 1.0 instead of 0.0: both pass check_float(low=0), and load_state_dict sets 0.0 itself (tested)"
    ),
    "rnb_kernels.mixing.dga.xǁDGADistributionǁdefault_bases__mutmut_7": (
        "np.asarray of a CPU tensor equals np.asarray of its .cpu(); only a CUDA tensor can tell"
    ),
    "rnb_kernels.mixing.dga.xǁDGADistributionǁdefault_bases__mutmut_14": (
        "dtype kinds are single letters: 'XXiuXX' holds the same integer kinds 'i' and 'u' and no other kind numpy uses ('X' is none)"
    ),
    "rnb_kernels.mixing.dga.xǁDGADistributionǁdefault_bases__mutmut_36": (
        "astype(None) is astype(float64) in numpy"
    ),
    "rnb_kernels.mixing.dga.xǁDGADistributionǁdefault_bases__mutmut_43": (
        "astype(None) is astype(float64) in numpy"
    ),
    "rnb_kernels.tracking.slot.xǁSlotǁ__init____mutmut_51": (
        "the buffer's or rows' device: None or no device is the CPU, the device of every CPU test; only a CUDA layer can tell"
    ),
    "rnb_kernels.tracking.slot.xǁSlotǁbind_sharded__mutmut_35": (
        "the buffer's or rows' device: None or no device is the CPU, the device of every CPU test; only a CUDA layer can tell"
    ),
    "rnb_kernels.tracking.slot.xǁSlotǁcontext_rows__mutmut_6": (
        "the buffer's or rows' device: None or no device is the CPU, the device of every CPU test; only a CUDA layer can tell"
    ),
    "rnb_kernels.tracking.slot.xǁSlotǁcontext_rows__mutmut_10": (
        "the buffer's or rows' device: None or no device is the CPU, the device of every CPU test; only a CUDA layer can tell"
    ),
    "rnb_kernels.tracking.slot.xǁSlotǁcontext_rows__mutmut_16": (
        "the buffer's or rows' device: None or no device is the CPU, the device of every CPU test; only a CUDA layer can tell"
    ),
    "rnb_kernels.tracking.slot.xǁSlotǁcontext_rows__mutmut_22": (
        "the buffer's or rows' device: None or no device is the CPU, the device of every CPU test; only a CUDA layer can tell"
    ),
    "rnb_kernels.tracking.slot.xǁSlotǁwgrad__mutmut_28": (
        "the buffer's or rows' device: None or no device is the CPU, the device of every CPU test; only a CUDA layer can tell"
    ),
    "rnb_kernels.tracking.slot.xǁSlotǁwgrad__mutmut_34": (
        "the buffer's or rows' device: None or no device is the CPU, the device of every CPU test; only a CUDA layer can tell"
    ),
    "rnb_kernels.tracking.slot.xǁSlotǁ__init____mutmut_15": (
        "self.device is only used to allocate buffers (None = the CPU, as in every CPU test); only a CUDA layer can tell"
    ),
    "rnb_kernels.tracking.slot.xǁSlotǁ__init____mutmut_55": (
        "the initial scale of an untouched (not dirty) group: _prepare_scale replaces it without rescaling, and rows() of all-zero buffers is zero whatever it divides by"
    ),
    "rnb_kernels.tracking.slot.xǁSlotǁ__init____mutmut_56": (
        "the initial scale of an untouched (not dirty) group: _prepare_scale replaces it without rescaling, and rows() of all-zero buffers is zero whatever it divides by"
    ),
    "rnb_kernels.tracking.slot.xǁSlotǁ__init____mutmut_58": (
        "dirty at construction: _prepare_scale then rescales buffers that are still all zero, which changes nothing"
    ),
    "rnb_kernels.tracking.slot.xǁSlotǁ__init____mutmut_59": (
        "dirty at construction: _prepare_scale then rescales buffers that are still all zero, which changes nothing"
    ),
    "rnb_kernels.tracking.slot.xǁSlotǁgram_parts__mutmut_41": (
        "row_offset dropped (default 0): only a row-sharded slot has a non-zero offset, and bind_sharded sets its exact_rows to 0, so it never has exact rows to take out"
    ),
    "rnb_kernels.tracking.slot.xǁSlotǁbind_sharded__mutmut_44": (
        "get_group(None) / size(None) on a 1-D mesh are its only group / its size; bind_sharded refuses other meshes before these lines"
    ),
    "rnb_kernels.tracking.slot.xǁSlotǁbind_sharded__mutmut_47": (
        "get_group(None) / size(None) on a 1-D mesh are its only group / its size; bind_sharded refuses other meshes before these lines"
    ),
    "rnb_kernels.tracking.slot.xǁSlotǁchoose_heavy__mutmut_12": (
        "nan=None or no nan= is nan_to_num's default, which maps NaN to 0.0 as well"
    ),
    "rnb_kernels.tracking.slot.xǁSlotǁchoose_heavy__mutmut_15": (
        "nan=None or no nan= is nan_to_num's default, which maps NaN to 0.0 as well"
    ),
    "rnb_kernels.tracking.slot.xǁSlotǁcontext_rows__mutmut_5": (
        "torch.full((n,), -1) without dtype infers int64 from the integer fill value: the same tensor"
    ),
    "rnb_kernels.tracking.slot.xǁSlotǁcontext_rows__mutmut_9": (
        "torch.full((n,), -1) without dtype infers int64 from the integer fill value: the same tensor"
    ),
    "rnb_kernels.tracking.slot.x__finite__mutmut_9": (
        "flags is empty only for empty x2 and dy2, and no tracked backward sees those: domain_ids must be non-empty (validate_domain_ids) and target blocks come from a real batch"
    ),
    "rnb_kernels.tracking.slot.x__finite__mutmut_12": (
        "flags is empty only for empty x2 and dy2, and no tracked backward sees those: domain_ids must be non-empty (validate_domain_ids) and target blocks come from a real batch"
    ),
    "rnb_kernels.tracking.slot.xǁSlotǁwgrad__mutmut_1": (
        "Slot.wgrad's default lo is never used: its only caller, tracked_wgrad, always passes lo"
    ),
    "rnb_kernels.tracking.slot.xǁSlotǁwgrad__mutmut_11": (
        "the explicit-rows branch taken more often: for a whole input (lo = 0, n = its rows) it computes the same rows accumulate() would"
    ),
    "rnb_kernels.tracking.slot.xǁSlotǁwgrad__mutmut_13": (
        "the explicit-rows branch taken more often: for a whole input (lo = 0, n = its rows) it computes the same rows accumulate() would"
    ),
    "rnb_kernels.tracking.slot.xǁSlotǁwgrad__mutmut_14": (
        "the explicit-rows branch taken more often: for a whole input (lo = 0, n = its rows) it computes the same rows accumulate() would"
    ),
    "rnb_kernels.tracking.slot.xǁSlotǁwgrad__mutmut_15": (
        "the explicit-rows branch taken more often: for a whole input (lo = 0, n = its rows) it computes the same rows accumulate() would"
    ),
    "rnb_kernels.tracking.slot.xǁSlotǁwgrad__mutmut_17": (
        "the explicit-rows branch taken more often: for a whole input (lo = 0, n = its rows) it computes the same rows accumulate() would"
    ),
    "rnb_kernels.tracking.slot.xǁSlotǁwgrad__mutmut_12": (
        "`lo != 1` changes the branch only for lo = 1 with n = -1 or n = len(x2), a chunk that cannot start at row 1 of its own rows (invalid input); for every valid chunk the n-condition takes the branch anyway"
    ),
    "rnb_kernels.tracking.slot.xǁSlotǁwgrad__mutmut_22": (
        "n = 0 means an input of 0 rows, and then x2 has 0 rows too: the same n either way"
    ),
    "rnb_kernels.tracking.slot.xǁSlotǁwgrad__mutmut_23": (
        "n = 0 means an input of 0 rows, and then x2 has 0 rows too: the same n either way"
    ),
    "rnb_kernels.tracking.tracker.xǁDomainGradientTrackerǁvalidate_ids__mutmut_36": (
        "the count's device (None / none = the CPU) or non_blocking on a CPU-to-CPU copy: only a CUDA tracker can tell"
    ),
    "rnb_kernels.tracking.tracker.xǁDomainGradientTrackerǁvalidate_ids__mutmut_38": (
        "the count's device (None / none = the CPU) or non_blocking on a CPU-to-CPU copy: only a CUDA tracker can tell"
    ),
    "rnb_kernels.tracking.tracker.xǁDomainGradientTrackerǁvalidate_ids__mutmut_39": (
        "the count's device (None / none = the CPU) or non_blocking on a CPU-to-CPU copy: only a CUDA tracker can tell"
    ),
    "rnb_kernels.tracking.tracker.xǁDomainGradientTrackerǁvalidate_ids__mutmut_40": (
        "the count's device (None / none = the CPU) or non_blocking on a CPU-to-CPU copy: only a CUDA tracker can tell"
    ),
    "rnb_kernels.tracking.tracker.xǁDomainGradientTrackerǁ_check_bypass__mutmut_37": (
        "the warning's stacklevel: mutmut's trampoline adds stack frames, so the tests skip the caller-line assertion under mutmut; outside mutmut test_unreached_layer_after_a_reached_one_is_reported_at_the_callers_line and test_bypass_warning_in_full check it"
    ),
    "rnb_kernels.tracking.tracker.xǁDomainGradientTrackerǁ_check_bypass__mutmut_38": (
        "the warning's stacklevel: mutmut's trampoline adds stack frames, so the tests skip the caller-line assertion under mutmut; outside mutmut test_unreached_layer_after_a_reached_one_is_reported_at_the_callers_line and test_bypass_warning_in_full check it"
    ),
    "rnb_kernels.tracking.tracker.xǁDomainGradientTrackerǁ_check_bypass__mutmut_73": (
        "the warning's stacklevel: mutmut's trampoline adds stack frames, so the tests skip the caller-line assertion under mutmut; outside mutmut test_unreached_layer_after_a_reached_one_is_reported_at_the_callers_line and test_bypass_warning_in_full check it"
    ),
    "rnb_kernels.tracking.tracker.xǁDomainGradientTrackerǁ_check_bypass__mutmut_74": (
        "the warning's stacklevel: mutmut's trampoline adds stack frames, so the tests skip the caller-line assertion under mutmut; outside mutmut test_unreached_layer_after_a_reached_one_is_reported_at_the_callers_line and test_bypass_warning_in_full check it"
    ),
    "rnb_kernels.tracking.tracker.xǁDomainGradientTrackerǁ__init____mutmut_188": (
        "self.device (None = the CPU) only places the counters; only a CUDA model can tell"
    ),
    "rnb_kernels.tracking.tracker.xǁDomainGradientTrackerǁ__init____mutmut_193": (
        "the counters' device (None / none = the CPU): only a CUDA model can tell"
    ),
    "rnb_kernels.tracking.tracker.xǁDomainGradientTrackerǁ__init____mutmut_196": (
        "the counters' device (None / none = the CPU): only a CUDA model can tell"
    ),
    "rnb_kernels.tracking.tracker.xǁDomainGradientTrackerǁ__init____mutmut_200": (
        "the counters' device (None / none = the CPU): only a CUDA model can tell"
    ),
    "rnb_kernels.tracking.tracker.xǁDomainGradientTrackerǁ__init____mutmut_203": (
        "the counters' device (None / none = the CPU): only a CUDA model can tell"
    ),
    "rnb_kernels.tracking.tracker.xǁDomainGradientTrackerǁ__init____mutmut_207": (
        "the counters' device (None / none = the CPU): only a CUDA model can tell"
    ),
    "rnb_kernels.tracking.tracker.xǁDomainGradientTrackerǁ__init____mutmut_210": (
        "the counters' device (None / none = the CPU): only a CUDA model can tell"
    ),
    "rnb_kernels.tracking.tracker.xǁDomainGradientTrackerǁ__init____mutmut_218": (
        "_synced = None instead of False at construction: it is only read as a condition, and None is falsy"
    ),
    "rnb_kernels.tracking.tracker.xǁDomainGradientTrackerǁ__init____mutmut_220": (
        "_removed = None instead of False: it is only read as a condition (_check_live), and None is falsy"
    ),
    "rnb_kernels.tracking.tracker.xǁDomainGradientTrackerǁ__init____mutmut_219": (
        "_synced = True at construction: with one process sync() returns early either way; with "
        "several, the first _begin() (every domains() / record_target() block) divides the "
        "still-zero buffers and counts by the group size and sets _synced = False, and a sync() "
        "before any block would only all-reduce zeros"
    ),
    "rnb_kernels.tracking.linear.x_rows_of__mutmut_18": (
        "non_blocking only matters for a copy from pinned host memory to a GPU; rows_of's ids are moved to the layer's device and read at once, and on the CPU every variant is a synchronous copy (or no copy)"
    ),
    "rnb_kernels.tracking.linear.x_rows_of__mutmut_19": (
        "non_blocking only matters for a copy from pinned host memory to a GPU; rows_of's ids are moved to the layer's device and read at once, and on the CPU every variant is a synchronous copy (or no copy)"
    ),
    "rnb_kernels.tracking.linear.x_rows_of__mutmut_29": (
        "non_blocking only matters for a copy from pinned host memory to a GPU; rows_of's ids are moved to the layer's device and read at once, and on the CPU every variant is a synchronous copy (or no copy)"
    ),
    "rnb_kernels.tracking.linear.x_rows_of__mutmut_30": (
        "non_blocking only matters for a copy from pinned host memory to a GPU; rows_of's ids are moved to the layer's device and read at once, and on the CPU every variant is a synchronous copy (or no copy)"
    ),
    "rnb_kernels.tracking.slot.xǁSlotǁaccumulate__mutmut_20": (
        "the buffer's or rows' device: None or no device is the CPU, the device of every CPU test; only a CUDA layer can tell"
    ),
    "rnb_kernels.tracking.slot.xǁSlotǁaccumulate__mutmut_45": (
        "check_ids=None instead of False: the ops read it as a truth value"
    ),
    "rnb_kernels.tracking.slot.xǁSlotǁaccumulate__mutmut_81": (
        "check_ids=None instead of False: the ops read it as a truth value"
    ),
    "rnb_kernels.tracking.slot.xǁSlotǁaccumulate__mutmut_132": (
        "check_ids=None instead of False: the ops read it as a truth value"
    ),
    "rnb_kernels.tracking.slot.xǁSlotǁaccumulate__mutmut_69": (
        "heavy is None whenever exact_rows is 0 (rows are only chosen with exact_rows > 0, and bind_sharded zeroes exact_rows before any round), so the condition changes nothing"
    ),
    "rnb_kernels.tracking.slot.xǁSlotǁbackward__mutmut_49": (
        "a gradient computed for an input that needs none is dropped by autograd (and autograd.grad(..., [anchor]) runs only what the anchor needs): cost only"
    ),
    "rnb_kernels.tracking.slot.xǁSlotǁbackward__mutmut_69": (
        "a gradient computed for an input that needs none is dropped by autograd (and autograd.grad(..., [anchor]) runs only what the anchor needs): cost only"
    ),
    "rnb_kernels.tracking.slot.xǁSlotǁbackward__mutmut_52": (
        "gw starts as '' instead of None but is replaced whenever need_w; need_w is False only for a frozen weight, whose forward never reaches the Function (make_forward returns the plain forward): unreachable"
    ),
    "rnb_kernels.tracking.slot.xǁSlotǁ__init____mutmut_28": (
        "local_rows = None at construction: _allocate() sets it (in __init__ for a plain "
        "weight, in ensure_buffers()/bind_sharded() for a DTensor) before its only readers, "
        "choose_heavy() (which returns first while energy is None, allocated by the same "
        "_allocate) and load_state_dict() (which calls ensure_buffers() first)"
    ),
    "rnb_kernels.tracking.slot.xǁSlotǁ__init____mutmut_32": (
        "tp_size = None at construction: it is read only for sharded slots (tp_group set), and "
        "bind_sharded() sets tp_size together with tp_group"
    ),
    "rnb_kernels.tracking.slot.xǁSlotǁ__init____mutmut_33": (
        "tp_size = 2 at construction: it is read only for sharded slots (tp_group set), and "
        "bind_sharded() sets tp_size together with tp_group"
    ),
    "rnb_kernels.tracking.tracker.xǁDomainGradientTrackerǁ_scale_value__mutmut_23": (
        "float('INF') is float('inf'): Python parses the name case-insensitively"
    ),
    "rnb_kernels.ops.reference.x_domain_projection_ref__mutmut_28": (
        "side=PROJ_OUT dropped: it is projection_matrix_ref's default side (pinned by test_references_at_their_defaults_hash_like_the_op_at_its)"
    ),
    "rnb_kernels.ops.reference.x_domain_projection_ref__mutmut_39": (
        "device=None / no device / .to(None) keeps CPU tensors on the CPU, the inputs' device in every CPU test; only a CUDA model can tell"
    ),
    "rnb_kernels.ops.reference.x_domain_rows_ref__mutmut_16": (
        "device=None / no device / .to(None) keeps CPU tensors on the CPU, the inputs' device in every CPU test; only a CUDA model can tell"
    ),
}


def killed_by_replant(path: Path) -> dict[str, str]:
    """Mutants that ``benchmarks/replant.py`` reproduced exactly and saw caught, from its report:
    ``{mutant: "plant (caught by test)"}``. They survive mutmut only because the tests that
    kill them run several processes or check a warning's line, outside mutmut's selection."""
    if not path.exists():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[2].startswith("`rnb_kernels.") and "caught by" in cells[4]:
            out[cells[2].strip("`")] = f"{cells[0]} ({cells[4]})"
    return out


def module_of(name: str) -> str:
    parts = name.split(".")
    for i, p in enumerate(parts):
        if p.startswith(("x_", "xǁ")):
            return ".".join(parts[:i])
    return name


def _carry_over(
    previous: str | None, by_module: dict[str, collections.Counter], outside: dict[str, str]
) -> tuple[list[str], list[str], list[str]]:
    """Table rows, survivor lines and replant-killed lines of ``previous`` for modules this run
    tested nothing of. A carried survivor that ``outside`` (replant.py) kills moves from the
    row's survivors to its killed-by-replant column."""
    if not previous:
        return [], [], []

    def untested(mod: str) -> bool:
        c = by_module.get(mod, collections.Counter())
        return sum(c.values()) == c["not checked"]

    text = Path(previous).read_text()
    # Survivor lists are per module (``- `module`: `name (survived)`, ...``); per-mutant lines
    # are equivalence arguments.
    surv_lines: dict[str, str] = {}
    for line in text.splitlines():
        m = re.match(r"- `(rnb_kernels[\w.]*)`: ", line)
        if m and module_of(m.group(1)) == m.group(1) and untested(m.group(1)):
            surv_lines[m.group(1)] = line
    rows, surv, killed = [], [], []
    for line in text.splitlines():
        m = re.match(r"\| (rnb_kernels[\w.]*)(?: \(earlier run\))? \|(.*)\| [\d.]+% \|$", line)
        if not (m and untested(m.group(1))):
            continue
        mod = m.group(1)
        cells = [c.strip() for c in m.group(2).split("|")]
        if len(cells) == 7:  # reports before the killed-by-replant column
            cells.insert(3, "0")
        names = re.findall(r"`(\S+) \(survived\)`", surv_lines.get(mod, ""))
        moved = [n for n in names if n in outside]
        c = collections.Counter(
            dict(zip(["not checked", "killed", "killed outside", "timeout", "survived",
                      "no tests", "equivalent"], map(int, cells[1:])))
        )  # fmt: skip
        if sum(c.values()) != int(cells[0]):
            raise ValueError(f"--previous: the counts of {mod} do not add up to its mutants")
        c["killed outside"] += len(moved)
        c["survived"] -= len(moved)
        killed += [f"- `{n}`: {outside[n]} (module carried from the earlier run)" for n in moved]
        left = [n for n in names if n not in outside]
        if left:
            surv.append(f"- `{mod}`: " + ", ".join(f"`{n} (survived)`" for n in left))
        rows.append((f"{mod} (earlier run)", c))
    return rows, surv, killed


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "mutation.md"))
    ap.add_argument("--results", help="read mutmut results from this file instead of running")
    ap.add_argument("--note", default="", help="a paragraph on how this run was made")
    ap.add_argument(
        "--previous",
        help="an earlier report: its rows (and survivor lists) for modules of which this run "
        "tested no mutant are carried over, marked as from that run",
    )
    ap.add_argument(
        "--replant",
        default=str(ROOT / "benchmarks" / "results" / "replant.md"),
        help="replant.py's report: survivors it reproduced and saw caught count as killed",
    )
    args = ap.parse_args()
    outside = killed_by_replant(Path(args.replant))
    if args.results:
        text = Path(args.results).read_text()
    else:
        text = subprocess.run(
            [sys.executable, "-m", "mutmut", "results", "--all", "true"],
            cwd=ROOT, capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
    by_module: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    survivors: dict[str, list[str]] = collections.defaultdict(list)
    equivalents: list[str] = []
    killed_outside: list[str] = []
    for line in text.splitlines():
        m = re.match(r"\s*(\S+): (.+)$", line)
        if not m:
            continue
        name, status = m.group(1), m.group(2).strip()
        mod = module_of(name)
        if status == "survived" and name in EQUIVALENT:
            status = "equivalent"
            equivalents.append(f"- `{name}`: {EQUIVALENT[name]}")
        elif status == "survived" and name in outside:
            status = "killed outside"
            killed_outside.append(f"- `{name}`: {outside[name]}")
        by_module[mod][status] += 1
        if status in ("survived", "no tests"):
            survivors[mod].append(f"{name} ({status})")
    rows = []
    tot = collections.Counter()
    for mod in sorted(by_module):
        c = by_module[mod]
        if sum(c.values()) == c["not checked"]:
            continue  # not run here: carried from --previous below, or not run at all
        tot.update(c)
        rows.append((mod, c))
    rows.append(("**all**", tot))
    carried_rows, carried_surv, carried_killed = _carry_over(args.previous, by_module, outside)
    killed_outside += carried_killed

    def score(c: collections.Counter) -> str:
        killed = c["killed"] + c["timeout"] + c["killed outside"]
        tested = killed + c["survived"] + c["no tests"] + c["suspicious"] + c["segfault"]
        return "-" if tested == 0 else f"{100.0 * killed / tested:.1f}%"

    lines = [
        "| module | mutants | not checked | killed | killed by replant | timeout | survived "
        "| no tests | equivalent | score |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def row(mod: str, c: collections.Counter) -> str:
        return (
            f"| {mod} | {sum(c.values())} | {c['not checked']} | {c['killed']} | {c['killed outside']} | "
            f"{c['timeout']} | {c['survived']} | {c['no tests']} | {c['equivalent']} | "
            f"{score(c)} |"
        )

    lines.extend(row(mod, c) for mod, c in rows)
    if carried_rows:
        lines.append("")
        lines.append(
            "Modules with no mutant tested in this run, as the earlier report (`--previous`) "
            "gave them (its code and mutant numbering, not re-checked here):"
        )
        lines.append("")
        lines.extend(lines[:2])
        lines.extend(row(mod, c) for mod, c in carried_rows)
    body = "\n".join(lines)
    surv = "\n".join(
        f"- `{mod}`: " + ", ".join(f"`{s}`" for s in sorted(v))
        for mod, v in sorted(survivors.items())
    )
    if carried_surv:
        surv += "\n\nFrom the earlier report (modules not re-run):\n\n" + "\n".join(carried_surv)
    equiv = "\n".join(sorted(equivalents)) or "none"
    outside_md = "\n".join(sorted(killed_outside)) or "none"
    Path(args.out).write_text(
        "# Mutation testing of the core\n\n"
        "Produced by `make mutation` (mutmut 3.8.1, config in `pyproject.toml` "
        "`[tool.mutmut]`; report by `benchmarks/mutation_report.py`). Score = (killed + "
        "killed by replant + timeout) / (mutants tested), equivalent mutants excluded; "
        "`not checked` mutants were not run and are left out of the score.\n\n"
        + (args.note + "\n\n" if args.note else "")
        + f"{body}\n\n## Surviving mutants\n\n{surv or 'none'}\n"
        + "\n## Survivors killed outside mutmut (`benchmarks/replant.py`)\n\n"
        + "Mutmut runs a selection of single-process tests. These mutants survive there and are "
        + "reproduced exactly by a plant of `benchmarks/replant.py`, whose tests (several "
        + "processes on gloo, or a warning's line) fail on them; they count as killed.\n\n"
        + f"{outside_md}\n"
        + f"\n## Equivalent mutants (excluded from the score)\n\n{equiv}\n"
    )
    print(body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
