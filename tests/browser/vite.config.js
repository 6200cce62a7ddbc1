// Bundles the test page (matrix-js-sdk + its Rust crypto as WebAssembly) into dist/.
export default {
  logLevel: "warn",
  build: { target: "esnext", outDir: "dist", emptyOutDir: true, chunkSizeWarningLimit: 10000 },
};
