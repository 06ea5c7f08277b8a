#!/bin/bash
# EAMSGD on CIFAR-10 with p = 8 workers: 2 nodes x 4 GPUs launched by torchrun (TorchElasticEnvironment).
# Run this same script on both nodes, with NODE_RANK=0 on the first and NODE_RANK=1 on the second, and
# MASTER_ADDR set to the first node's address:
#   MASTER_ADDR=node0.example.org NODE_RANK=0 examples/torchrun_two_nodes.sh    # on node0
#   MASTER_ADDR=node0.example.org NODE_RANK=1 examples/torchrun_two_nodes.sh    # on node1
set -euo pipefail
: "${MASTER_ADDR:?set MASTER_ADDR to the first node's address}"
: "${NODE_RANK:?set NODE_RANK to 0 on the first node and 1 on the second}"
RUN_ID="${RUN_ID:-cifar10-torchrun}"   # must be the same on both nodes

torchrun --nnodes=2 --nproc-per-node=4 --node-rank="$NODE_RANK" \
    --master-addr="$MASTER_ADDR" --master-port="${MASTER_PORT:-29500}" \
    recipes/cifar10.py \
    experiment=cifar10_paper_eamsgd \
    trainer=gpu trainer.devices=4 trainer.num_nodes=2 \
    data.data_dir="$HOME/data/cifar10" \
    hydra.run.dir="outputs/cifar10/${RUN_ID}"
