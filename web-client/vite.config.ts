import { defineConfig } from 'vite';

// Static build into dist/, served by `meridian serve` at `/` (see README "Web client").
export default defineConfig({
  base: './',
  build: { outDir: 'dist', emptyOutDir: true, sourcemap: true, target: 'es2022' },
  test: { include: ['test/**/*.test.ts'], environment: 'node' },
});
