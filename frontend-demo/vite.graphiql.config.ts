// Builds the offline GraphiQL page into ../assets/graphiql/ as exactly three
// files with fixed names: index.html, graphiql.js, graphiql.css.
// The server embeds them and serves them at /graphiql, /graphiql/graphiql.js
// and /graphiql/graphiql.css.
import { defineConfig } from 'vite';
import { fileURLToPath } from 'node:url';

const root = fileURLToPath(new URL('./graphiql', import.meta.url));
const outDir = fileURLToPath(new URL('../assets/graphiql', import.meta.url));

export default defineConfig({
  root,
  base: '/graphiql/',
  publicDir: false,
  logLevel: 'info',
  define: { 'process.env.NODE_ENV': JSON.stringify('production') },
  build: {
    outDir,
    emptyOutDir: true,
    target: 'es2020',
    minify: true,
    cssCodeSplit: false,
    sourcemap: false,
    modulePreload: false,
    assetsInlineLimit: 100_000_000, // inline any font/icon: no extra files
    chunkSizeWarningLimit: 4096,
    rollupOptions: {
      // React libraries mark files "use client"; irrelevant in a browser bundle.
      onwarn(warning, warn) {
        if (warning.code === 'MODULE_LEVEL_DIRECTIVE') return;
        warn(warning);
      },
      input: `${root}/index.html`,
      output: {
        inlineDynamicImports: true, // a single JS file, no chunks
        entryFileNames: 'graphiql.js',
        chunkFileNames: 'graphiql.js',
        assetFileNames: (info) =>
          (info.names ?? [info.name ?? '']).some((n) => n.endsWith('.css')) ? 'graphiql.css' : '[name][extname]',
      },
    },
  },
});
