// Bundles NiiVue with src/viewport.js into dist/viewport.js (`npm run build`), with one build-time change to
// NiiVue: after each re-render of the background volume NiiVue computes its gradient texture (blur and Sobel
// passes over every slice), which only its 3D rendering uses. The reading viewport never shows the 3D render, and
// on a software renderer (SwiftShader) that gradient is ~17 s for a 512 x 512 x 150 volume, again at every
// window change. The change skips it when the viewer's option `withoutGradient` is set. The build fails if the
// statement is not found exactly once (a NiiVue update that moved it: check the change still applies).
import { readFile } from "node:fs/promises";
import * as esbuild from "esbuild";

const STATEMENT = "      this.volumeTexture = outTexture;\n      this.gradientTexture = gradientGL({";
const GATED = "      this.volumeTexture = outTexture;\n"
  + "      if (!this.opts.withoutGradient) this.gradientTexture = gradientGL({";

const skipGradient = {
  name: "niivue-without-gradient",
  setup(build) {
    build.onLoad({ filter: /@niivue[\\/]niivue[\\/]build[\\/]niivue[\\/]index\.js$/ }, async (args) => {
      const source = await readFile(args.path, "utf8");
      const found = source.split(STATEMENT).length - 1;
      if (found !== 1) throw new Error(`${args.path}: the gradient statement was found ${found} times, not once`);
      return { contents: source.replace(STATEMENT, GATED), loader: "js" };
    });
  },
};

await esbuild.build({
  entryPoints: ["src/viewport.js"], bundle: true, format: "esm", minify: !process.argv.includes("--no-minify"),
  target: "es2020", outfile: "dist/viewport.js", logLevel: "warning", plugins: [skipGradient],
});
