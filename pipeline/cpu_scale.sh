# Sourced by the CPU-scale scripts (quickstart.sh, codec_seeds.sh, tables.sh): the
# teacher's cache settings, written once so every cache of the quickstart's teacher is comparable.
# 300 proposals (the default is 1000) keep the cache small at 128 px, where the RoI KD samples 64 RoIs
# per image from them; orig+hflip serves training's random horizontal flip.
CPU_TEACHER=r18_fpn_cpu
CPU_CACHE_ARGS=(--views orig,hflip --proposals 300)
