"""The peer of `bench_service.py`: LitServe serving the same model the same way, so that the
service's throughput can be compared with a well-known model server in the same run.

Same ONNX file and session settings (`byorl.model_dir.load_onnx_session`), the same request body
({"images": [base64, ...]}) decoded by the same function
(`byorl.service.serving.images.decode_images`), dynamic batching of up to 64 images waiting at
most 4 ms (LitServe's), unit-length embeddings in the answer. LitServe runs its API server and
its inference worker as processes of their own.

    python bench/litserve_peer.py --model-dir models/default --port 8100  # POST /embed

Needs `pip install litserve` (0.2.19 was measured); `bench_service.py --peer` starts it.
"""

import argparse

import litserve as ls
import numpy as np

from byorl.model_dir import embed, load_onnx_session, read_card
from byorl.service.serving.images import decode_images
from byorl.service.settings import Settings


class EmbedAPI(ls.LitAPI):
    """One request = one image (what the bench sends); LitServe batches requests."""

    def __init__(self, model_dir: str, threads: int, max_batch: int, wait_s: float):
        super().__init__(max_batch_size=max_batch, batch_timeout=wait_s, api_path="/embed")
        self.model_dir, self.threads = model_dir, threads

    def setup(self, device):
        self.session = load_onnx_session(self.model_dir, self.threads)
        self.size = read_card(self.model_dir)["input_size"][-1]
        self.settings = Settings(model_dir=self.model_dir, data_dir="unused")

    def decode_request(self, request):
        images = request["images"]
        return decode_images(images, self.size, self.settings, len(images))[0]

    def batch(self, inputs):
        return np.stack(inputs)

    def predict(self, x):
        vectors = embed(self.session, x, len(x))
        return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)

    def unbatch(self, output):
        return list(output)

    def encode_response(self, output):
        return {"embeddings": [output.tolist()]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", default="models/default")
    p.add_argument("--port", type=int, default=8100)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--wait-ms", type=float, default=4.0)
    args = p.parse_args()
    api = EmbedAPI(args.model_dir, args.threads, args.max_batch, args.wait_ms / 1000)
    server = ls.LitServer(api, accelerator="cpu", devices=1, workers_per_device=1)
    server.run(host="127.0.0.1", port=args.port, num_api_servers=1, log_level="warning",
               generate_client_file=False)


if __name__ == "__main__":
    main()
