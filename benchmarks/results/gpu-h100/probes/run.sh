# as run on the H100 (engines in /tmp/eng/sd15-fp16; PYTHONPATH at the repo root)
B='"cudnn_conv_algo_search": "EXHAUSTIVE"'
for r in 1 2; do for comp in unet vae_decoder; do for cfg in "{$B}" "{$B, \"prefer_nhwc\": \"1\"}" "{$B, \"cudnn_conv_use_max_workspace\": \"0\", \"arena_extend_strategy\": \"kSameAsRequested\"}" "{$B, \"prefer_nhwc\": \"1\", \"arena_extend_strategy\": \"kSameAsRequested\"}"; do
python3 cuda_options.py "$cfg" $comp 2>/dev/null | tail -1; done; done; done > cuda_options.jsonl
# arena.jsonl: first `own shared` twice (before the shrink modes were added), then:
for r in 1 2; do for mode in own shared shrink ownshrink; do python3 arena.py $mode 2>&1 | tail -1; done; done
