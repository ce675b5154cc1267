"""The transformers generator: in-process, CPU or CUDA, left padding and an attention mask, greedy or sampled."""

from __future__ import annotations

from cbt_llm.core.errors import ConfigError
from cbt_llm.inference.models import (
    chat_ids,
    check_vocab,
    load_chat_tokenizer,
    resolve_model,
    stop_token_ids,
    torch_dtype,
)
from cbt_llm.inference.prompt import Generation, Prompt, cut_at_stop, sample_seed


class HFGenerator:
    """Generation with transformers in this process, on CPU or one CUDA device: greedy (generate_batch, what eval
    and the server's temperature 0 use) or sampled with a seed per prompt (sample)."""

    backend = "transformers"
    batches_internally = False
    # ZeRO-3 across ranks: every forward is collective, so ranks step together until all are done (transformers'
    # synced_gpus), and generate_all gives every rank the same number of generate calls
    synced_gpus = False

    def __init__(
        self,
        path: str,
        *,
        adapter: str = "",
        device: str = "cpu",
        dtype: str = "auto",
        trust_remote_code: bool = False,
        field: str = "model",
    ):
        from transformers import AutoModelForCausalLM

        source = resolve_model(path, adapter, field)
        self.tokenizer = load_chat_tokenizer(source, field)
        self.name, self.device = source.name, device
        try:
            model = AutoModelForCausalLM.from_pretrained(
                source.base, dtype=torch_dtype(dtype, device), trust_remote_code=trust_remote_code
            )
        except OSError as exc:
            raise ConfigError(f"{field}.path: cannot load '{source.base}': {str(exc).splitlines()[0]}") from None
        if source.adapter:
            from peft import PeftModel

            # merged once here: the same function as base + adapter, without LoRA's extra matmuls on every token
            model = PeftModel.from_pretrained(model, source.adapter).merge_and_unload()
        check_vocab(self.tokenizer, model, source, field)
        self.model = model.to(device).eval()
        self.stop_ids = stop_token_ids(self.tokenizer, model.generation_config.eos_token_id)
        self.pad_id = self.tokenizer.pad_token_id

    @classmethod
    def around(cls, model, tokenizer, *, device: str, name: str, synced_gpus: bool = False) -> HFGenerator:
        """A generator over a model already in memory, e.g. the one being trained (train.gen_eval_every); the
        tokenizer pads on the left (load_chat_tokenizer)."""
        self = cls.__new__(cls)
        self.model, self.tokenizer, self.name, self.device = model, tokenizer, name, device
        self.stop_ids = stop_token_ids(tokenizer, model.generation_config.eos_token_id)
        self.pad_id, self.synced_gpus = tokenizer.pad_token_id, synced_gpus
        return self

    def prompt_ids(self, prompt: Prompt) -> list[int]:
        """The token ids the model is given for `prompt`."""
        return chat_ids(self.tokenizer, prompt)

    def decoding_config(self, max_new_tokens: int):
        from transformers import GenerationConfig

        # every field that could change greedy decoding is set: unset ones are filled from the model's
        # generation_config.json (transformers >= 5), which for chat models carries sampling defaults and penalties
        return GenerationConfig(
            max_new_tokens=max_new_tokens,
            min_new_tokens=0,
            do_sample=False,
            num_beams=1,
            temperature=1.0,
            top_k=50,
            top_p=1.0,
            repetition_penalty=1.0,
            no_repeat_ngram_size=0,
            eos_token_id=self.stop_ids,
            pad_token_id=self.pad_id,
        )

    def generate_ids(self, prompt_ids: list[list[int]], max_new_tokens: int) -> list[tuple[list[int], str]]:
        """Greedy continuations of a batch of prompts, left padded: (new token ids up to and including the stop
        token, finish) per prompt."""
        import torch

        batch = self.tokenizer.pad({"input_ids": prompt_ids}, padding=True, return_tensors="pt").to(self.device)
        with torch.inference_mode():
            out = self.model.generate(
                **batch, generation_config=self.decoding_config(max_new_tokens), synced_gpus=self.synced_gpus
            )
        new = out[:, batch["input_ids"].shape[1] :].tolist()
        return [cut_at_stop(row, self.stop_ids) for row in new]

    def generate_batch(
        self, prompts: list[Prompt], max_new_tokens: int, prompt_ids: list[list[int]] | None = None
    ) -> list[Generation]:
        """Answer `prompts` as one batch; `prompt_ids` (from prompt_ids()) saves tokenizing them again."""
        ids = prompt_ids if prompt_ids is not None else [self.prompt_ids(p) for p in prompts]
        outs = self.generate_ids(ids, max_new_tokens)
        return [
            Generation(p.id, self.tokenizer.decode(toks, skip_special_tokens=True).strip(), len(x), len(toks), fin)
            for p, x, (toks, fin) in zip(prompts, ids, outs)
        ]

    def sample(
        self,
        prompts: list[Prompt],
        n: int,
        max_new_tokens: int,
        *,
        temperature: float,
        top_p: float,
        seed: int,
    ) -> list[list[Generation]]:
        """`n` sampled answers to each prompt (temperature, top_p; top_k off, no penalties). Each prompt is one
        generate call of n rows with the sampler seeded by sample_seed(seed, prompt id), so a prompt's answers
        depend on the seed, the prompt and the model alone: not on the other prompts, their order or a resumed
        run's starting point."""
        import torch

        if temperature <= 0 or n < 1:
            raise ValueError(f"sampling needs temperature > 0 and n >= 1 (got {temperature}, {n})")
        cfg = self.decoding_config(max_new_tokens)
        cfg.do_sample, cfg.temperature, cfg.top_p, cfg.top_k = True, float(temperature), float(top_p), 0
        out: list[list[Generation]] = []
        for p in prompts:
            ids = self.prompt_ids(p)
            x = torch.tensor([ids] * n, device=self.device)
            torch.manual_seed(sample_seed(seed, p.id))  # seeds CUDA too
            with torch.inference_mode():
                rows = self.model.generate(input_ids=x, attention_mask=torch.ones_like(x), generation_config=cfg)
            cut = [cut_at_stop(r, self.stop_ids) for r in rows[:, len(ids) :].tolist()]
            out.append(
                [
                    Generation(
                        p.id, self.tokenizer.decode(toks, skip_special_tokens=True).strip(), len(ids), len(toks), fin
                    )
                    for toks, fin in cut
                ]
            )
        return out
