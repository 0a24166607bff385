"""Prompt learning with OpenPrompt 1.0.1's API: an OpenPrompt script runs with its imports changed to
``from opendelta_dist.prompts import ...``, with any delta of this library on the language model::

    template = MixedTemplate(model=plm, tokenizer=tokenizer, text='{"placeholder":"text_a"} {"soft"} {"mask"}.')
    verbalizer = ManualVerbalizer(tokenizer, num_classes=2, label_words=[["bad"], ["good"]])
    delta = LoraModel(backbone_model=plm)
    delta.freeze_module(exclude=["deltas"])
    prompt_model = PromptForClassification(plm, template, verbalizer)
    ...
    save_prompt("out/", prompt_model, delta_model=delta)      # the delta and the prompt, one directory
    prompt_model = load_prompt("out/", fresh_plm, tokenizer)  # the same outputs
"""

from opendelta_dist.prompts.calibrate import calibrate
from opendelta_dist.prompts.data import InputExample, InputFeatures
from opendelta_dist.prompts.dataloader import PromptDataLoader
from opendelta_dist.prompts.errors import PromptError, TemplateError, VerbalizerError, WrappingError
from opendelta_dist.prompts.generation_verbalizer import GenerationVerbalizer
from opendelta_dist.prompts.pipeline import PromptForClassification, PromptForGeneration, PromptModel
from opendelta_dist.prompts.plms import get_model_class, load_plm
from opendelta_dist.prompts.saving import load_prompt, save_prompt
from opendelta_dist.prompts.seq2seq_wrappers import BartTokenizerWrapper, T5LMTokenizerWrapper, T5TokenizerWrapper
from opendelta_dist.prompts.soft_templates import MixedTemplate, SoftTemplate
from opendelta_dist.prompts.soft_verbalizer import SoftVerbalizer
from opendelta_dist.prompts.templates import ManualTemplate, Template
from opendelta_dist.prompts.verbalizers import ManualVerbalizer, One2oneVerbalizer, Verbalizer
from opendelta_dist.prompts.wrappers import LMTokenizerWrapper, MLMTokenizerWrapper, TokenizerWrapper

__all__ = [
    "BartTokenizerWrapper",
    "GenerationVerbalizer",
    "InputExample",
    "InputFeatures",
    "LMTokenizerWrapper",
    "MLMTokenizerWrapper",
    "ManualTemplate",
    "ManualVerbalizer",
    "MixedTemplate",
    "One2oneVerbalizer",
    "PromptDataLoader",
    "PromptError",
    "PromptForClassification",
    "PromptForGeneration",
    "PromptModel",
    "SoftTemplate",
    "SoftVerbalizer",
    "T5LMTokenizerWrapper",
    "T5TokenizerWrapper",
    "Template",
    "TemplateError",
    "TokenizerWrapper",
    "Verbalizer",
    "VerbalizerError",
    "WrappingError",
    "calibrate",
    "get_model_class",
    "load_plm",
    "load_prompt",
    "save_prompt",
]
