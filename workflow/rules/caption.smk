# Captions from a frozen vision-language model (multimodal text): one table per dataset and
# source (cover, video), before extraction. The chunked progress lives beside the output in
# {out}.parts (not a declared output, so a killed job resumes); a changed prompt, model or
# generation setting is a changed param, so captioning and what reads it rerun.


rule caption:
    input:
        data="results/{ds}/data",
        captioner=get_captioner_inputs,
        frames=get_caption_frames,
    output:
        directory("results/{ds}/captions/{source}"),
    log:
        "results/logs/{ds}/caption/{source}.log",
    benchmark:
        "results/benchmarks/{ds}/caption/{source}.tsv"
    wildcard_constraints:
        source="cover|video",
    conda:
        "../../envs/iisan.yaml"
    resources:
        gpu=1,
    params:
        captioner=get_captioner,
        frames=get_frames_flag,
        listing=get_frames_listing,
        code=code_hash("caption"),
    shell:
        "iisan --log {log} caption --data {input.data} --captioner {params.captioner:q} --source {wildcards.source} "
        "{params.frames} --out {output}"
