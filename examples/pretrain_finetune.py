"""Pretrain on digits 0-4, fine-tune on 5-9: the demo, as a script you can edit."""

from jaxtrain.demo import format_table, run_demo

if __name__ == "__main__":
    print(format_table(run_demo("demo_out", seed=0, steps=300)))
