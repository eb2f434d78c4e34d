"""bus_model.training: the training application built on the ``bus_model`` library (ARCHITECTURE.md).

The library (``bus_model``: configs, towers, PAD, losses, selection, ``save_pretrained``) imports
nothing from here. One concern per module:

    cli          the ``bus`` command: a table of subcommands -> modules
    command      one subcommand's parser, ``--config FILE``, errors -> exit status 2
    errors       UsageError
    train        ``bus train``: the loop, top to bottom
    args         ``bus train`` flags and their checks
    distributed  rank/device, torchrun process group, DDP/FSDP2 wrapping, collectives
    model_setup  config + tokenizer -> BusModel, activation checkpointing
    batches      dataset and the resumable per-rank batch stream
    optim        AdamW, cosine schedule with warm-up
    grads        gradient averaging and clipping (FSDP shards too)
    metrics      metrics.jsonl, TensorBoard, progress bar
    state        training state to/from checkpoints, --resume checks
    checkpoint   atomic run checkpoints on disk
    evaluate     ``bus eval``: encode a held-out set, retrieval and captioning
    eval_metrics Recall@K, ranks, ITM re-ranking, BLEU-4 / CIDEr

Nothing is imported here, so ``import bus_model.training.checkpoint`` loads only what it needs.
"""
