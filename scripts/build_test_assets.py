#!/usr/bin/env python
"""Build the tiny, committed test assets under ``tests/assets/`` (deterministically, on CPU, in about a minute).

    python scripts/build_test_assets.py [--out tests/assets]

What it writes (see tests/assets/README.md):

- ``data/train.jsonl`` (300), ``data/dev.jsonl`` (40): a synthetic instruction set drawn from templates with a
  simple, learnable structure (fixed facts, copying, reversing, single-digit sums), in the record shapes the
  library accepts: Alpaca ``{instruction, input, output}`` and pre-formatted ``{prompt, output}`` (some dev
  records carry a list of references);
- ``data/pretrain.txt``: 200 plain-English lines from the same vocabulary (the PT-loss corpus);
- ``data/seqkd.jsonl``: one teacher sample per train prompt, ``{prompt, output}`` (the SeqKD input format);
- ``tokenizer/``: a byte-level BPE (512 entries, the full byte alphabet, so any text encodes) wrapped in
  ``PreTrainedTokenizerFast`` with a chat template;
- ``teacher/``: a 2-layer Llama trained briefly on the train set's responses, so that its response
  distributions are peaked (the script prints its dev loss and mean max-probability);
- ``student/``: a smaller, randomly initialised Llama with the same vocabulary;
- ``teacher-b/``: a second teacher of different behaviour for multi-teacher routing: ``teacher/`` with the rows of
  its LM head permuted among the non-special tokens (a fixed seeded cipher: it prefers other tokens, but EOS stays);
- ``data/routed.jsonl``: the train records with a ``source`` field, ``language`` or ``facts`` by task
  (``configs/tiny/multi-teacher.yaml`` routes them to the two teachers).

Determinism: every random choice comes from seeded generators, training runs on one CPU thread with
deterministic algorithms, and nothing records the time or the machine, so two runs on the same software
stack write byte-identical files. (Float results may differ on other CPUs or library versions.)

The script deliberately does not import ``minillm``: the assets must not change when library code changes.
The reference template below is the exact text of the official data processing (lmops-notes §6).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SEED = 1234
NUM_TRAIN, NUM_DEV, NUM_PRETRAIN = 300, 40, 200
PROMPT_RECORD_SHARE = 0.25      # share of records stored pre-formatted as {prompt, output}
VOCAB_SIZE = 512
EOS, PAD = "<|endoftext|>", "<|pad|>"

TEMPLATE = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
            "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
TEMPLATE_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                       "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
                       "{instruction}\n\n### Input:\n{input}\n\n### Response:\n")

# A plain user/assistant template; the assistant turn ends with EOS so a chat-tuned model learns to stop.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ message['content'] + '\n\n' }}"
    "{%- elif message['role'] == 'user' -%}{{ '### User:\n' + message['content'] + '\n\n' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ '### Assistant:\n' + message['content'] + eos_token + '\n\n' }}"
    "{%- else -%}{{ raise_exception('unknown chat role: ' + message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '### Assistant:\n' }}{%- endif -%}"
)

TEACHER_SHAPE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     intermediate_size=128)
STUDENT_SHAPE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                     intermediate_size=64)
TRAIN_STEPS, BATCH_SIZE, LR, WARMUP = 400, 16, 3e-3, 40

# ----------------------------------------------------------------------------------------- vocabulary
WORDS = ["cat", "dog", "bird", "fish", "tree", "book", "lamp", "cup", "door", "ship",
         "star", "moon", "rain", "wind", "fire", "stone", "bread", "milk", "road", "hill"]
COLOURS = [("sky", "blue"), ("grass", "green"), ("snow", "white"), ("sun", "yellow"), ("coal", "black"),
           ("blood", "red"), ("sea", "blue"), ("leaf", "green"), ("cloud", "white"), ("banana", "yellow"),
           ("night", "black"), ("tomato", "red")]
CAPITALS = [("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Germany", "Berlin"),
            ("Japan", "Tokyo"), ("Egypt", "Cairo"), ("Peru", "Lima"), ("Greece", "Athens"),
            ("Norway", "Oslo"), ("Kenya", "Nairobi"), ("Canada", "Ottawa"), ("China", "Beijing")]
SOUNDS = [("cow", "moo"), ("dog", "woof"), ("cat", "meow"), ("duck", "quack"), ("sheep", "baa"),
          ("owl", "hoot"), ("lion", "roar"), ("bee", "buzz")]
OPPOSITES = [("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("old", "new"),
             ("day", "night"), ("happy", "sad"), ("light", "dark"), ("open", "closed"), ("early", "late")]


# ----------------------------------------------------------------------------------------- data
def task_repeat(rng: random.Random) -> tuple[str, str, str]:
    word = rng.choice(WORDS)
    return f"Repeat the word: {word}", "", f"{word} {word}"


def task_reverse(rng: random.Random) -> tuple[str, str, str]:
    words = rng.sample(WORDS, 3)
    return "Reverse the order of the words.", " ".join(words), " ".join(reversed(words))


def task_colour(rng: random.Random) -> tuple[str, str, str]:
    thing, colour = rng.choice(COLOURS)
    return f"What colour is the {thing}?", "", f"The {thing} is {colour}."


def task_add(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randrange(10), rng.randrange(10)
    return f"Add {a} and {b}.", "", str(a + b)


def task_capital(rng: random.Random) -> tuple[str, str, str]:
    country, capital = rng.choice(CAPITALS)
    return f"Name the capital of {country}.", "", f"{capital}."


def task_sound(rng: random.Random) -> tuple[str, str, str]:
    animal, sound = rng.choice(SOUNDS)
    return f"What sound does a {animal} make?", "", f"A {animal} says {sound}."


def task_opposite(rng: random.Random) -> tuple[str, str, str]:
    word, opposite = rng.choice(OPPOSITES)
    if rng.random() < 0.5:
        word, opposite = opposite, word
    return "Give the opposite of the word.", word, opposite


def task_next(rng: random.Random) -> tuple[str, str, str]:
    n = rng.randrange(1, 20)
    return f"What number comes after {n}?", "", str(n + 1)


TASKS = [task_repeat, task_reverse, task_colour, task_add, task_capital, task_sound, task_opposite, task_next]

# Alternative correct answers, used as extra references in some dev records (multi-reference scoring).
ALT_ANSWERS = {task_colour: lambda out: out.rstrip(".").split()[-1].capitalize() + ".",
               task_capital: lambda out: out.rstrip("."),
               task_sound: lambda out: out.rstrip(".").split()[-1].capitalize() + "."}


def render_reference_prompt(instruction: str, input_text: str) -> str:
    if input_text:
        return TEMPLATE_WITH_INPUT.format(instruction=instruction, input=input_text)
    return TEMPLATE.format(instruction=instruction)


def make_records(rng: random.Random, count: int, *, multi_reference: bool) -> list[dict]:
    """``count`` records cycling through the tasks in a shuffled order, in mixed record shapes."""
    order = [TASKS[i % len(TASKS)] for i in range(count)]
    rng.shuffle(order)
    records = []
    for task in order:
        instruction, input_text, output = task(rng)
        if rng.random() < PROMPT_RECORD_SHARE:
            refs: str | list[str] = output
            if multi_reference and task in ALT_ANSWERS:
                refs = [output, ALT_ANSWERS[task](output)]
            records.append({"prompt": render_reference_prompt(instruction, input_text), "output": refs})
        else:
            records.append({"instruction": instruction, "input": input_text, "output": output})
    return records


def make_pretrain_lines(rng: random.Random, count: int) -> list[str]:
    """Short plain-English documents built from the instruction set's facts, two sentences each."""
    sentences = [
        lambda: "The {} is {}.".format(*rng.choice(COLOURS)),
        lambda: "The capital of {} is {}.".format(*rng.choice(CAPITALS)),
        lambda: "A {} says {}.".format(*rng.choice(SOUNDS)),
        lambda: "The opposite of {} is {}.".format(*rng.choice(OPPOSITES)),
        lambda: (lambda a, b: f"{a} and {b} make {a + b}.")(rng.randrange(10), rng.randrange(10)),
        lambda: "I saw a {} near the {}.".format(*rng.sample(WORDS, 2)),
        lambda: (lambda n: f"After {n} comes {n + 1}.")(rng.randrange(1, 20)),
    ]
    return [" ".join(rng.choice(sentences)() for _ in range(2)) for _ in range(count)]


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def prompt_and_output(record: dict) -> tuple[str, str]:
    """The prompt text (reference template unless pre-formatted) and the first reference."""
    prompt = record["prompt"] if "prompt" in record else render_reference_prompt(record["instruction"],
                                                                                  record["input"])
    output = record["output"] if isinstance(record["output"], str) else record["output"][0]
    return prompt, output


# ----------------------------------------------------------------------------------------- tokenizer
def build_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.post_processor = processors.ByteLevel(trim_offsets=False)  # offsets only; adds no tokens
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=[EOS, PAD], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token=EOS, bos_token=EOS, pad_token=PAD,
                                        model_max_length=512, clean_up_tokenization_spaces=False)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


# ----------------------------------------------------------------------------------------- tokenisation
def encode_example(tokenizer, prompt: str, output: str) -> tuple[list[int], int]:
    """(prompt + response + EOS ids, prompt length), as the library tokenises SFT data (DESIGN §3)."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full = tokenizer(prompt + output, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt_ids + full[len(prompt_ids):], len(prompt_ids)


def make_batch(examples: list[tuple[list[int], int]], pad_id: int):
    """Right-padded ``input_ids = ids[:-1]``, ``labels = ids[1:]`` with −100 on prompt and padding."""
    import torch

    length = max(len(ids) for ids, _ in examples) - 1
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), -100, dtype=torch.long)
    attention = torch.zeros((len(examples), length), dtype=torch.long)
    for row, (ids, prompt_len) in enumerate(examples):
        n = len(ids) - 1
        input_ids[row, :n] = torch.tensor(ids[:-1])
        labels[row, prompt_len - 1:n] = torch.tensor(ids[prompt_len:])
        attention[row, :n] = 1
    return input_ids, labels, attention


# ----------------------------------------------------------------------------------------- models
def make_model(shape: dict, tokenizer, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=512, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **shape)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).float()
    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = (tokenizer.bos_token_id, tokenizer.eos_token_id,
                                                             tokenizer.pad_token_id)
    return model


def train_teacher(model, examples: list[tuple[list[int], int]], pad_id: int, seed: int) -> list[float]:
    """AdamW with linear warm-up and cosine decay; loss on response + EOS tokens only."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.98), weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / WARMUP) * 0.5 * (1 + math.cos(math.pi * min(s, TRAIN_STEPS) / TRAIN_STEPS)))
    model.train()
    order: list[int] = []
    losses = []
    for step in range(TRAIN_STEPS):
        if len(order) < BATCH_SIZE:
            order += torch.randperm(len(examples), generator=generator).tolist()
        batch, order = [examples[i] for i in order[:BATCH_SIZE]], order[BATCH_SIZE:]
        input_ids, labels, attention = make_batch(batch, pad_id)
        # Our labels are already shifted (labels[t] is the token after input_ids[t]), so the loss is computed
        # here rather than by the model, which would shift them a second time.
        logits = model(input_ids=input_ids, attention_mask=attention).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if (step + 1) % 100 == 0:
            print(f"  teacher step {step + 1:4d}  loss {sum(losses[-100:]) / 100:.4f}", flush=True)
    model.eval()
    return losses


def response_stats(model, examples: list[tuple[list[int], int]], pad_id: int) -> tuple[float, float]:
    """Token-level mean CE and mean max-probability over response + EOS tokens (teacher forcing)."""
    import torch

    input_ids, labels, attention = make_batch(examples, pad_id)
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention).logits.float()
    mask = labels != -100
    logprobs = torch.log_softmax(logits, dim=-1)
    ce = -logprobs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)[mask].mean()
    max_prob = logprobs.max(dim=-1).values.exp()[mask].mean()
    return ce.item(), max_prob.item()


def generate(model, tokenizer, prompts: list[str], *, do_sample: bool, seed: int, max_new_tokens: int = 24) -> list[str]:
    import torch

    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, add_special_tokens=False, return_tensors="pt", padding=True)
    tokenizer.padding_side = "right"
    torch.manual_seed(seed)
    with torch.no_grad():
        sampling = dict(top_k=0, top_p=1.0, temperature=1.0) if do_sample else {}
        out = model.generate(**enc, do_sample=do_sample, max_new_tokens=max_new_tokens, **sampling,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return [t.strip() for t in tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)]




# ----------------------------------------------------------------------------------------- main
LANGUAGE_TASKS = ("Repeat the word", "Reverse the order", "opposite of the word", "What colour is")


def routed_records(records: list[dict]) -> list[dict]:
    """The records with a ``source`` field: ``language`` for the copy/word tasks, ``facts`` for the rest."""
    def text(r: dict) -> str:
        return r.get("prompt") or r["instruction"]
    return [{**r, "source": "language" if any(k in text(r) for k in LANGUAGE_TASKS) else "facts"} for r in records]


def make_teacher_b(teacher, tokenizer):
    """A copy of ``teacher`` whose LM-head rows are permuted among the non-special tokens (seeded): a teacher of
    different behaviour with the same vocabulary, shapes and EOS."""
    import copy

    import torch

    special = set(tokenizer.all_special_ids)
    ids = [i for i in range(len(tokenizer)) if i not in special]
    shuffled = list(ids)
    random.Random(SEED + 2).shuffle(shuffled)
    model = copy.deepcopy(teacher)
    with torch.no_grad():
        weight = model.get_output_embeddings().weight
        weight[ids] = weight[shuffled].clone()
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "tests" / "assets"),
                        help="output folder (default: tests/assets next to this script)")
    args = parser.parse_args()
    start = time.time()

    import torch

    torch.set_num_threads(1)  # one thread: reductions in a fixed order, so reruns are byte-identical
    torch.use_deterministic_algorithms(True)

    out = Path(args.out)
    for sub in ("data", "tokenizer", "teacher", "student", "teacher-b"):  # README.md is hand-written and kept
        shutil.rmtree(out / sub, ignore_errors=True)
    (out / "data").mkdir(parents=True)

    rng = random.Random(SEED)
    train = make_records(rng, NUM_TRAIN, multi_reference=False)
    dev = make_records(rng, NUM_DEV, multi_reference=True)
    pretrain = make_pretrain_lines(rng, NUM_PRETRAIN)
    write_jsonl(out / "data" / "train.jsonl", train)
    write_jsonl(out / "data" / "dev.jsonl", dev)
    (out / "data" / "pretrain.txt").write_text("\n".join(pretrain) + "\n", encoding="utf-8")
    print(f"data: {len(train)} train, {len(dev)} dev, {len(pretrain)} pre-training lines")

    pairs_train = [prompt_and_output(r) for r in train]
    pairs_dev = [prompt_and_output(r) for r in dev]
    corpus = [p + o for p, o in pairs_train + pairs_dev] + pretrain
    tokenizer = build_tokenizer(corpus)
    # Saved into every folder now, before any padded call: padding settings would otherwise be stored too.
    for sub in ("tokenizer", "teacher", "student", "teacher-b"):
        tokenizer.save_pretrained(out / sub)
    print(f"tokenizer: {len(tokenizer)} entries, eos {tokenizer.eos_token_id}, pad {tokenizer.pad_token_id}")

    enc_train = [encode_example(tokenizer, p, o) for p, o in pairs_train]
    enc_dev = [encode_example(tokenizer, p, o) for p, o in pairs_dev]
    prompt_lengths = [n for _, n in enc_train + enc_dev]
    response_lengths = [len(ids) - n for ids, n in enc_train + enc_dev]
    print(f"prompt tokens: max {max(prompt_lengths)}, mean {sum(prompt_lengths) / len(prompt_lengths):.1f}; "
          f"response tokens (with EOS): max {max(response_lengths)}")

    pad = tokenizer.pad_token_id
    from transformers import AutoTokenizer

    gen_tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")  # the saved files, as users load them
    teacher = make_model(TEACHER_SHAPE, tokenizer, SEED)
    print(f"teacher: {sum(p.numel() for p in teacher.parameters()):,} parameters, "
          f"dev loss before training {response_stats(teacher, enc_dev, pad)[0]:.3f} (log V = {math.log(len(tokenizer)):.3f})")
    train_teacher(teacher, enc_train, pad, SEED)
    dev_loss, dev_max_prob = response_stats(teacher, enc_dev, pad)
    train_loss, train_max_prob = response_stats(teacher, enc_train, pad)
    print(f"teacher: train loss {train_loss:.3f} (max-prob {train_max_prob:.3f}); "
          f"dev loss {dev_loss:.3f}, dev mean max-prob {dev_max_prob:.3f}")
    greedy = generate(teacher, gen_tokenizer, [p for p, _ in pairs_dev], do_sample=False, seed=SEED)
    exact = sum(g == o for g, (_, o) in zip(greedy, pairs_dev))
    print(f"teacher greedy on dev: {exact}/{len(dev)} exact; e.g. " +
          "; ".join(f"{o!r} -> {g!r}" for g, (_, o) in list(zip(greedy, pairs_dev))[:4]))
    teacher.save_pretrained(out / "teacher", safe_serialization=True)
    make_teacher_b(teacher, tokenizer).save_pretrained(out / "teacher-b", safe_serialization=True)
    write_jsonl(out / "data" / "routed.jsonl", routed_records(train))

    # SeqKD data: one sampled teacher response (T = 1) per train prompt.
    prompts = [p for p, _ in pairs_train]
    samples = []
    for i in range(0, len(prompts), 100):
        samples += generate(teacher, gen_tokenizer, prompts[i:i + 100], do_sample=True, seed=SEED + i)
    write_jsonl(out / "data" / "seqkd.jsonl", [{"prompt": p, "output": s} for p, s in zip(prompts, samples)])
    print(f"seqkd: {len(samples)} teacher samples, {sum(s == o for s, (_, o) in zip(samples, pairs_train))} "
          "equal to the gold response")

    student = make_model(STUDENT_SHAPE, tokenizer, SEED + 1)
    s_loss, s_max_prob = response_stats(student, enc_dev, pad)
    print(f"student: {sum(p.numel() for p in student.parameters()):,} parameters, untrained; "
          f"dev loss {s_loss:.3f}, dev mean max-prob {s_max_prob:.4f}")
    student.save_pretrained(out / "student", safe_serialization=True)

    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out} ({total / 1e6:.2f} MB) in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
